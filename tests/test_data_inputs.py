"""Inputs users write by hand (split files, CSVs, folders, seeds): a misread one is an error, not bad data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import image_folder, miniimagenet_root, omniglot_root

from fewshot.cli import main
from fewshot.config import ConfigError, from_dict
from fewshot.data import catalog
from fewshot.data.datasets import _subset, load_dataset
from fewshot.data.sampler import EpisodeSampler
from fewshot.data.store import Store
from fewshot.errors import CorruptDataError, EpisodeError, FewShotError

# --- rotations on a split that already has them -----------------------------------------------


def _no_store(*args, **kwargs):
    raise AssertionError("the image store was built before the split was checked")


def test_rotations_on_a_split_file_listing_rotations_is_refused_before_decoding(tmp_path, monkeypatch):
    root = omniglot_root(tmp_path / "data")
    split = tmp_path / "split.txt"
    split.write_text("Alpha/character01/rot000\nAlpha/character01/rot090\nAlpha/character02\n")
    monkeypatch.setattr("fewshot.data.datasets.load_store", _no_store)
    with pytest.raises(FewShotError, match=r"already has rotations as classes \(line 2: .*data\.rotations"):
        load_dataset("omniglot", str(split), data_root=root, rotations=True, progress=False)


def test_rotations_on_a_vinyals_split_is_refused(tmp_path):
    root = omniglot_root(tmp_path / "data")
    folder = root / "omniglot" / "splits" / "vinyals"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("Alpha/character01/rot000\nAlpha/character01/rot090\n")
    with pytest.raises(
        FewShotError, match="split 'train' already has rotations.*'background' or 'evaluation'"
    ):
        load_dataset("omniglot", "train", data_root=root, rotations=True, progress=False)
    plain = load_dataset("omniglot", "train", data_root=root, progress=False)
    with pytest.raises(FewShotError, match="already has rotations as classes"):
        plain.with_rotations()


def test_rotations_of_a_plain_character_split_file_are_four_distinct_classes(tmp_path):
    root = omniglot_root(tmp_path / "data")
    split = tmp_path / "split.txt"
    split.write_text("Gamma/character02\nAlpha/character01\n")
    ds = load_dataset("omniglot", str(split), data_root=root, rotations=True, progress=False)
    assert ds.class_names[:4] == [f"Gamma/character02/rot{r:03d}" for r in (0, 90, 180, 270)]
    assert ds.rotation.tolist() == [0, 1, 2, 3] * 2
    assert len(set(zip(ds.store_class.tolist(), ds.rotation.tolist(), strict=True))) == ds.num_classes == 8
    with pytest.raises(FewShotError, match="already has rotations"):
        ds.with_rotations()


def test_rotations_of_the_background_split_still_multiply_classes(tmp_path):
    root = omniglot_root(tmp_path / "data")
    ds = load_dataset("omniglot", "background", data_root=root, rotations=True, progress=False)
    assert ds.num_classes == 4 * 5
    assert ds.class_names[:2] == ["Alpha/character01/rot000", "Alpha/character01/rot090"]


# --- split files ------------------------------------------------------------------------------


def test_split_file_with_byte_order_mark_and_upper_case_suffix(tmp_path):
    root = omniglot_root(tmp_path / "data")
    split = tmp_path / "mine.TXT"
    split.write_bytes("\ufeffGamma/character02\r\nAlpha/character01/rot180\r\n".encode())
    ds = load_dataset("omniglot", str(split), data_root=root, progress=False)
    assert ds.class_names == ["Gamma/character02/rot000", "Alpha/character01/rot180"]


# --- mini-ImageNet CSVs -----------------------------------------------------------------------


def _csv(root, split: str) -> str:
    return (root / "miniimagenet" / f"{split}.csv").read_text()


def test_miniimagenet_csv_fields_are_stripped_and_blank_rows_skipped(tmp_path):
    root = miniimagenet_root(tmp_path / "data")
    path = root / "miniimagenet" / "train.csv"
    header, *rows = _csv(root, "train").splitlines()
    spaced = [" " + row.replace(",", " , ") + " " for row in rows]  # " n0100000000.jpg , n01 "
    path.write_text(
        "\ufeff" + header + "\n\n" + "\n".join(spaced[:5]) + "\n  \n" + "\n".join(spaced[5:]) + "\n\n"
    )
    ds = load_dataset("miniimagenet", "train", data_root=root, image_size=8, progress=False)
    assert ds.class_names == ["n01", "n02", "n03"]
    assert ds.counts.tolist() == [4, 4, 4]


def test_miniimagenet_label_in_two_split_csvs_is_an_error(tmp_path):
    root = miniimagenet_root(tmp_path / "data")
    path = root / "miniimagenet" / "test.csv"
    images = root / "miniimagenet" / "images"
    (images / "n0600000009.jpg").write_bytes((images / "n0600000000.jpg").read_bytes())
    path.write_text(_csv(root, "test") + "n0600000009.jpg, n02\n")
    with pytest.raises(
        CorruptDataError, match=r"test\.csv, line 10: label 'n02' is also a class of .*train\.csv"
    ):
        load_dataset("miniimagenet", "test", data_root=root, image_size=8, progress=False)


def test_miniimagenet_filename_listed_twice_is_an_error(tmp_path):
    root = miniimagenet_root(tmp_path / "data")
    path = root / "miniimagenet" / "val.csv"
    path.write_text(_csv(root, "val") + "n0100000000.jpg ,n04\n")
    with pytest.raises(
        CorruptDataError, match=r"val\.csv, line 10: image 'n0100000000\.jpg' is listed again"
    ):
        load_dataset("miniimagenet", "val", data_root=root, image_size=8, progress=False)


def test_a_split_never_takes_another_splits_class_of_the_same_name(tmp_path):
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1)
    store = Store(images, np.array([0, 2, 4]), ["nA", "nA"], key="k", groups=["train", "test"])
    with pytest.raises(FewShotError, match=r"two classes named 'nA' \(in 'train' and 'test'\)"):
        _subset("miniimagenet", "train", store, store.group("train"))


# --- folders ----------------------------------------------------------------------------------


def test_folder_with_a_class_named_train_is_a_class_folder(tmp_path):
    root = image_folder(tmp_path / "vehicles", {"bus": 2, "car": 2, "train": 2})
    ds = load_dataset(f"folder:{root}", "all", image_size=8, progress=False)
    assert ds.class_names == ["bus", "car", "train"]
    assert catalog.splits_of(f"folder:{root}") == ("all",)
    with pytest.raises(FewShotError, match="no 'train' split.*train/ holds images directly"):
        load_dataset(f"folder:{root}", "train", image_size=8, progress=False)


def test_folder_mixing_split_and_class_layouts_names_the_clash(tmp_path):
    root = tmp_path / "mixed"
    image_folder(root / "train", {"a": 2, "b": 2})
    image_folder(root, {"extra": 2})
    with pytest.raises(
        FewShotError, match="mixes two layouts: train/ holds class folders.*extra/ holds images"
    ):
        load_dataset(f"folder:{root}", "train", image_size=8, progress=False)


def test_verify_checks_each_split_of_a_split_folder(tmp_path, capsys):
    root = tmp_path / "mine"
    for split in ("train", "val", "test"):
        image_folder(root / split, {f"{split}a": 2, f"{split}b": 3})
    lines = catalog.verify(f"folder:{root}", image_size=8)
    assert [line.split(":")[0] for line in lines[:3]] == [
        f"decoded store ({s} split)" for s in ("train", "val", "test")
    ]
    assert "2 classes, 5 images (2-3 per class)" in lines[0] and lines[-1] == "ok"
    assert main(["datasets", "verify", f"folder:{root}", "--image-size", "8"]) == 0


# --- seeds ------------------------------------------------------------------------------------


def test_negative_sampler_seed_is_rejected_when_the_sampler_is_made(tmp_path):
    ds = load_dataset(str(image_folder(tmp_path / "mine", {"a": 2, "b": 2})), "all", image_size=8)
    with pytest.raises(EpisodeError, match="seed must be a whole number of at least 0, got -1.*eval.seed"):
        EpisodeSampler(ds, 2, 1, 1, seed=-1)


@pytest.mark.parametrize(("tree", "key"), [({"seed": -1}, "seed"), ({"eval": {"seed": -5}}, "eval.seed")])
def test_negative_config_seed_names_the_setting(tree, key):
    with pytest.raises(ConfigError, match=rf"{key}: Input should be greater than or equal to 0"):
        from_dict(tree)
