"""Real-data tier: runs when FEWSHOT_DATA points at the real datasets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fewshot.data.catalog import verify
from fewshot.data.datasets import load_dataset
from fewshot.data.sampler import EpisodeSampler

pytestmark = pytest.mark.realdata


def test_omniglot_parts_have_published_sizes(real_data_root):
    bg = load_dataset("omniglot", "background", data_root=real_data_root, download=False)
    ev = load_dataset("omniglot", "evaluation", data_root=real_data_root, download=False)
    assert (bg.num_classes, ev.num_classes) == (964, 659)
    assert bg.num_images + ev.num_images == 32460
    assert set(bg.counts) == {20}


def test_vinyals_split_sizes(real_data_root):
    sizes = {
        s: load_dataset("omniglot", s, data_root=real_data_root, download=False).num_classes
        for s in ("train", "val", "test")
    }
    assert sizes == {"train": 4112, "val": 688, "test": 1692}


def test_verify_passes(real_data_root):
    lines = verify("omniglot", str(real_data_root), download=False)
    assert lines[0].startswith("50 alphabets, 1623 characters")
    assert lines[-1] == "ok"


def test_vinyals_test_classes_disjoint_from_train(real_data_root):
    train = load_dataset("omniglot", "train", data_root=real_data_root, download=False)
    test = load_dataset("omniglot", "test", data_root=real_data_root, download=False)
    chars = lambda ds: {n.rsplit("/", 1)[0] for n in ds.class_names}  # noqa: E731
    assert not chars(train) & chars(test)
    batch = EpisodeSampler(test, 20, 5, 15, tasks=2, seed=0)[0]
    assert batch.support.shape == (2, 100, 1, 28, 28)


REPO = Path(__file__).resolve().parents[1]
RANDOM_SPLIT = REPO / "docs" / "experiments" / "splits" / "omniglot-random-seed0"


def test_committed_random_split_is_what_the_script_writes(real_data_root, tmp_path):
    """The random-split rows in docs/results.md are rerun from these files; the script must rebuild them."""
    script = REPO / "benchmarks" / "random_split.py"
    command = [sys.executable, str(script), "--out", str(tmp_path), "--data-root", str(real_data_root)]
    subprocess.run(command, check=True, capture_output=True)
    chars = {}
    for split, classes in (("train", 4400), ("val", 400), ("test", 1692)):
        assert (tmp_path / f"{split}.txt").read_text() == (RANDOM_SPLIT / f"{split}.txt").read_text()
        ds = load_dataset("omniglot", str(RANDOM_SPLIT / f"{split}.txt"), data_root=real_data_root)
        assert ds.num_classes == classes
        chars[split] = {n.rsplit("/", 1)[0] for n in ds.class_names}
    train, val, test = chars["train"], chars["val"], chars["test"]
    assert not (train & test or train & val or val & test)
    assert len(train | val | test) == 1623
