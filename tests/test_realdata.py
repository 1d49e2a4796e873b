"""Real-data tier: runs when FEWSHOT_DATA points at the real datasets."""

from __future__ import annotations

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
