"""Sources, store and dataset views on generated fixtures in each on-disk format."""

from __future__ import annotations

import functools
import http.server
import io
import os
import threading
import zipfile

import numpy as np
import pytest
import torch
from fixtures import image_folder, miniimagenet_root, omniglot_root, omniglot_zip
from PIL import Image

from fewshot.data import store as store_module
from fewshot.data.datasets import load_dataset, vinyals_characters
from fewshot.data.download import md5sum
from fewshot.data.sources import omniglot
from fewshot.data.store import decode
from fewshot.errors import CorruptDataError, DataNotFoundError, FewShotError


def test_omniglot_from_archives(tmp_path):
    root = omniglot_root(tmp_path / "data")
    bg = load_dataset("omniglot", "background", data_root=root, progress=False)
    ev = load_dataset("omniglot", "evaluation", data_root=root, progress=False)
    assert (bg.num_classes, ev.num_classes) == (5, 2)
    assert bg.class_names[0] == "Alpha/character01"
    assert bg.image_shape == (1, 28, 28)
    images = bg.store.images
    assert images.dtype == torch.uint8
    # polarity: ink (a minority of pixels) is bright, the paper is dark
    assert (images > 127).float().mean() < 0.3
    assert images.max() == 255


def test_omniglot_from_extracted_folders(tmp_path):
    zipped = omniglot_root(tmp_path / "zipped")
    root = tmp_path / "extracted" / "omniglot"
    for part in omniglot.PARTS:
        with zipfile.ZipFile(zipped / "omniglot" / f"images_{part}.zip") as z:
            z.extractall(root)
    a = load_dataset("omniglot", "background", data_root=tmp_path / "extracted", progress=False)
    b = load_dataset("omniglot", "background", data_root=zipped, progress=False)
    assert a.class_names == b.class_names
    assert torch.equal(a.store.images, b.store.images)


def test_image_size_is_configurable(tmp_path):
    root = omniglot_root(tmp_path / "data")
    ds = load_dataset("omniglot", "background", data_root=root, image_size=14, progress=False)
    assert ds.image_shape == (1, 14, 14)


def test_vinyals_split_from_data_root(tmp_path):
    root = omniglot_root(tmp_path / "data")
    folder = root / "omniglot" / "splits" / "vinyals"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text(
        "Alpha/character01/rot000\nAlpha/character01/rot090\nGamma/character02/rot270\n"
    )
    (folder / "val.txt").write_text("Beta/character01/rot180\n")
    ds = load_dataset("omniglot", "train", data_root=root, progress=False)
    assert ds.class_names == [
        "Alpha/character01/rot000",
        "Alpha/character01/rot090",
        "Gamma/character02/rot270",
    ]
    assert ds.rotation.tolist() == [0, 1, 3]
    # a rotated class holds the rotated images of its character
    assert torch.equal(ds.class_images(1), torch.rot90(ds.class_images(0), 1, dims=(-2, -1)))
    trainval = load_dataset("omniglot", "trainval", data_root=root, progress=False)
    assert trainval.num_classes == 4


def test_split_from_a_class_list_file(tmp_path):
    root = omniglot_root(tmp_path / "data")
    split = tmp_path / "mine" / "train.txt"
    split.parent.mkdir()
    split.write_text("Gamma/character02\nAlpha/character01/rot180\n")
    ds = load_dataset("omniglot", str(split), data_root=root, progress=False)
    assert ds.class_names == ["Gamma/character02/rot000", "Alpha/character01/rot180"]
    assert ds.rotation.tolist() == [0, 2]
    plain = load_dataset("omniglot", "background", data_root=root, progress=False)
    alpha = plain.class_names.index("Alpha/character01")
    assert torch.equal(ds.class_images(1), torch.rot90(plain.class_images(alpha), 2, dims=(-2, -1)))


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        (None, DataNotFoundError, "does not exist"),
        ("\n", DataNotFoundError, "lists no classes"),
        ("Alpha/character01/rot045\n", FewShotError, "line 1: 'Alpha/character01/rot045' is not a class"),
        ("Alpha/character01\nAlpha\n", FewShotError, "line 2: 'Alpha' is not a class"),
        ("Alpha/character01\n\nAlpha/character01/rot000\n", FewShotError, "line 3: .* repeats line 1"),
        ("Alpha/character99\n", DataNotFoundError, "classes that the data does not have"),
    ],
)
def test_bad_class_list_file_names_the_line_and_the_fix(tmp_path, text, error, match):
    root = omniglot_root(tmp_path / "data")
    split = tmp_path / "split.txt"
    if text is not None:
        split.write_text(text)
    with pytest.raises(error, match=match):
        load_dataset("omniglot", str(split), data_root=root, progress=False)


def test_bad_class_list_file_is_reported_before_the_images_are_decoded(tmp_path, monkeypatch):
    root = omniglot_root(tmp_path / "data")
    split = tmp_path / "split.txt"
    split.write_text("Alpha/character01\nAlpha\n")

    def no_store(*args, **kwargs):
        raise AssertionError("the image store was built before the split file was checked")

    monkeypatch.setattr("fewshot.data.datasets.load_store", no_store)
    with pytest.raises(FewShotError, match="line 2: 'Alpha' is not a class"):
        load_dataset("omniglot", str(split), data_root=root, progress=False)


def test_unknown_named_split_lists_the_choices(tmp_path):
    root = omniglot_root(tmp_path / "data")
    with pytest.raises(FewShotError, match="no split 'training'.*or give a .txt file"):
        load_dataset("omniglot", "training", data_root=root, progress=False)


def test_packaged_vinyals_split_has_published_sizes():
    sizes = {s: len(vinyals_characters(None, s)) for s in ("train", "val", "test", "trainval")}
    assert sizes == {"train": 4112, "val": 688, "test": 1692, "trainval": 4800}


def test_split_naming_missing_classes_is_an_error(tmp_path):
    root = omniglot_root(tmp_path / "data")
    with pytest.raises(DataNotFoundError, match="lists .* classes that the data does not have"):
        load_dataset("omniglot", "test", data_root=root, progress=False)  # packaged split, tiny data


def test_no_data_says_where_it_looked_and_how_to_supply(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("omniglot", "background", data_root=tmp_path / "empty", download=False)
    message = str(err.value)
    assert str(tmp_path / "empty" / "omniglot" / "images_background.zip") in message
    assert "--data-root" in message and "FEWSHOT_DATA" in message and "download" in message


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/served."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_on_first_use_checks_md5(http_root, monkeypatch, isolated_cache):
    served, url = http_root
    src = omniglot_root(served)
    md5 = {p: md5sum(src / "omniglot" / f"images_{p}.zip") for p in omniglot.PARTS}
    monkeypatch.setattr(omniglot, "URL", url + "/omniglot/images_{part}.zip")
    monkeypatch.setattr(omniglot, "MD5", md5)
    ds = load_dataset("omniglot", "background", progress=False)
    assert ds.num_classes == 5
    downloaded = isolated_cache / "downloads" / "omniglot" / "images_background.zip"
    assert downloaded.is_file()
    # a second run uses the earlier download: no server needed
    monkeypatch.setattr(omniglot, "URL", "http://127.0.0.1:9/nothing/{part}.zip")
    assert load_dataset("omniglot", "evaluation", progress=False).num_classes == 2


def test_corrupt_download_is_rejected_and_not_kept(http_root, monkeypatch, isolated_cache):
    served, url = http_root
    omniglot_root(served)
    monkeypatch.setattr(omniglot, "URL", url + "/omniglot/images_{part}.zip")
    monkeypatch.setattr(omniglot, "MD5", {p: "0" * 32 for p in omniglot.PARTS})
    with pytest.raises(CorruptDataError, match="MD5"):
        load_dataset("omniglot", "background", progress=False)
    folder = isolated_cache / "downloads" / "omniglot"
    assert not list(folder.iterdir())


def test_failed_download_names_the_ways_to_supply(http_root, monkeypatch):
    _, url = http_root
    monkeypatch.setattr(omniglot, "URL", url + "/missing/images_{part}.zip")
    with pytest.raises(DataNotFoundError, match="(?s)could not be downloaded.*FEWSHOT_DATA"):
        load_dataset("omniglot", "background", progress=False)


def test_injected_fetch_function(tmp_path, isolated_cache):
    src = omniglot_root(tmp_path / "src")
    md5 = {p: md5sum(src / "omniglot" / f"images_{p}.zip") for p in omniglot.PARTS}

    def fetch(url: str):
        part = "background" if "background" in url else "evaluation"
        return open(src / "omniglot" / f"images_{part}.zip", "rb")

    original = omniglot.MD5
    omniglot.MD5 = md5
    try:
        source = omniglot.locate(None, isolated_cache, allow_download=True, fetch=fetch)
    finally:
        omniglot.MD5 = original
    assert len(source.classes()) == 7


def test_truncated_archive_names_the_file(tmp_path):
    root = omniglot_root(tmp_path / "data")
    archive = root / "omniglot" / "images_background.zip"
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDataError, match="images_background.zip"):
        load_dataset("omniglot", "background", data_root=root, progress=False)


def test_unreadable_image_in_archive_names_the_member(tmp_path):
    root = omniglot_root(tmp_path / "data")
    archive = root / "omniglot" / "images_evaluation.zip"
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("images_evaluation/Gamma/character03/9999_01.png", b"not a png at all")
    with pytest.raises(CorruptDataError, match="character03/9999_01.png"):
        load_dataset("omniglot", "evaluation", data_root=root, progress=False)


def test_folder_dataset(tmp_path):
    root = image_folder(tmp_path / "mine", {"cat": 3, "dog": 4, "eel": 2}, fmt="jpg")
    (root / "notes.txt").write_text("not a class")
    ds = load_dataset(str(root), "all", image_size=8, progress=False)
    assert ds.class_names == ["cat", "dog", "eel"]
    assert ds.counts.tolist() == [3, 4, 2]
    assert ds.image_shape == (3, 8, 8)
    assert ds.mean is not None  # RGB folders use ImageNet normalisation


def test_folder_with_split_subfolders(tmp_path):
    root = tmp_path / "mine"
    image_folder(root / "train", {"a": 2, "b": 2})
    image_folder(root / "test", {"c": 2})
    assert load_dataset(f"folder:{root}", "test", image_size=8).class_names == ["c"]
    with pytest.raises(FewShotError, match="no 'val' split"):
        load_dataset(f"folder:{root}", "val", image_size=8)


def test_folder_without_splits_refuses_a_train_split(tmp_path):
    root = image_folder(tmp_path / "mine", {"a": 2})
    with pytest.raises(FewShotError, match="one split 'all'"):
        load_dataset(str(root), "train", image_size=8)


def test_unreadable_image_in_folder_names_the_file(tmp_path):
    root = image_folder(tmp_path / "mine", {"a": 2, "b": 2})
    (root / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(CorruptDataError, match=r"b[/\\]broken.png"):
        load_dataset(str(root), "all", image_size=8, progress=False)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="no class folders with images"):
        load_dataset(str(tmp_path / "empty"), "all")


def test_unknown_dataset_name():
    with pytest.raises(FewShotError, match="Unknown dataset 'imagenet'"):
        load_dataset("imagenet", "train")


def test_miniimagenet_layout(tmp_path):
    root = miniimagenet_root(tmp_path / "data")
    train = load_dataset("miniimagenet", "train", data_root=root, image_size=10, progress=False)
    test = load_dataset("miniimagenet", "test", data_root=root, image_size=10, progress=False)
    assert train.class_names == ["n01", "n02", "n03"] and test.class_names == ["n06", "n07"]
    assert train.image_shape == (3, 10, 10)
    assert train.counts.tolist() == [4, 4, 4]
    default = load_dataset("miniimagenet", "val", data_root=root, progress=False)
    assert default.image_shape == (3, 84, 84)


def test_miniimagenet_missing_image_is_named(tmp_path):
    root = miniimagenet_root(tmp_path / "data")
    (root / "miniimagenet" / "images" / "n0400000000.jpg").unlink()
    with pytest.raises(DataNotFoundError, match="n0400000000.jpg"):
        load_dataset("miniimagenet", "val", data_root=root, image_size=10, progress=False)


# --- the store: decode once, cache, rebuild when the source changes ---------------------------


def _count_decodes(monkeypatch) -> list[int]:
    calls = [0]
    real = store_module.decode

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "decode", counting)
    return calls


def test_second_run_decodes_no_image(tmp_path, monkeypatch):
    root = omniglot_root(tmp_path / "data")
    calls = _count_decodes(monkeypatch)
    first = load_dataset("omniglot", "background", data_root=root, progress=False)
    assert calls[0] == 7 * 20
    second = load_dataset("omniglot", "evaluation", data_root=root, progress=False)
    again = load_dataset("omniglot", "background", data_root=root, mmap=True, progress=False)
    assert calls[0] == 7 * 20
    assert second.num_classes == 2
    assert torch.equal(first.store.images, again.store.images)


def test_cache_never_written_into_data_root(tmp_path, isolated_cache):
    root = omniglot_root(tmp_path / "data")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    os.chmod(root / "omniglot", 0o555)
    try:
        load_dataset("omniglot", "background", data_root=root, progress=False)
    finally:
        os.chmod(root / "omniglot", 0o755)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert list((isolated_cache / "stores").iterdir())


def test_changed_source_rebuilds_cache(tmp_path, monkeypatch, isolated_cache):
    root = omniglot_root(tmp_path / "data")
    assert load_dataset("omniglot", "background", data_root=root, progress=False).num_classes == 5
    archive = root / "omniglot" / "images_background.zip"
    omniglot_zip(archive, "background", {"Alpha": 3, "Beta": 3})
    calls = _count_decodes(monkeypatch)
    assert load_dataset("omniglot", "background", data_root=root, progress=False).num_classes == 6
    assert calls[0] == 8 * 20
    assert len(list((isolated_cache / "stores").iterdir())) == 1  # the stale cache is gone


def test_truncated_cache_is_rebuilt_not_trusted(tmp_path, monkeypatch, isolated_cache):
    root = omniglot_root(tmp_path / "data")
    ds = load_dataset("omniglot", "background", data_root=root, progress=False)
    images = ds.store.path / "images.npy"
    images.write_bytes(images.read_bytes()[:1000])
    calls = _count_decodes(monkeypatch)
    again = load_dataset("omniglot", "background", data_root=root, progress=False)
    assert calls[0] == 7 * 20
    assert torch.equal(again.store.images, ds.store.images)


def test_cache_with_foreign_key_is_rebuilt(tmp_path, monkeypatch):
    root = omniglot_root(tmp_path / "data")
    ds = load_dataset("omniglot", "background", data_root=root, progress=False)
    meta = ds.store.path / "meta.json"
    meta.write_text(meta.read_text().replace(ds.store.key, "0" * 64))
    calls = _count_decodes(monkeypatch)
    load_dataset("omniglot", "background", data_root=root, progress=False)
    assert calls[0] > 0


def test_rotation_augmentation_multiplies_classes(tmp_path):
    root = image_folder(tmp_path / "mine", {"a": 2, "b": 3})
    ds = load_dataset(str(root), "all", image_size=6, rotations=True, progress=False)
    assert ds.num_classes == 8
    assert ds.class_names[:4] == ["a/rot000", "a/rot090", "a/rot180", "a/rot270"]
    assert torch.equal(ds.class_images(2), torch.rot90(ds.class_images(0), 2, dims=(-2, -1)))
    assert np.array_equal(ds.counts, [2, 2, 2, 2, 3, 3, 3, 3])


# --- decoding users' images as they are displayed ---------------------------------------------


def _reopened(image: Image.Image, fmt: str, **save) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    buf.seek(0)
    return Image.open(buf)


def test_decode_turns_photos_by_their_exif_orientation():
    halves = np.zeros((40, 80), np.uint8)
    halves[:, 40:] = 255  # stored: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: top black, bottom white
    photo = _reopened(Image.fromarray(halves).convert("RGB"), "JPEG", exif=exif.tobytes(), quality=95)
    grey = decode(photo, 8, 1, False)[0].astype(int)
    assert grey[0].mean() < 30 and grey[-1].mean() > 225
    assert abs(grey[:, 0].mean() - grey[:, -1].mean()) < 30


def test_decode_puts_transparent_images_on_white():
    stroke = np.zeros((32, 32, 4), np.uint8)
    stroke[8:24, 14:18] = (0, 0, 0, 255)  # opaque black ink; elsewhere transparent black
    for image in (Image.fromarray(stroke, "RGBA"), Image.fromarray(stroke, "RGBA").convert("LA")):
        grey = decode(image, 32, 1, False)[0]
        assert grey[0, 0] == 255 and grey[16, 16] == 0
        assert decode(image, 32, 1, True)[0, 0, 0] == 0  # inverted: dark paper, bright ink
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.info["transparency"] = 0
    assert (decode(_reopened(palette, "PNG"), 8, 3, False) == 255).all()


def test_decode_scales_16_bit_grey_to_8_bits():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    scan = _reopened(Image.fromarray(ramp), "PNG")
    assert scan.mode.startswith("I;16")
    grey = decode(scan, 64, 1, False)[0].astype(int)
    assert np.abs(grey - np.rint(ramp / 257)).max() <= 1
    assert np.array_equal(decode(scan, 64, 3, False), np.repeat(grey[None], 3, axis=0))


def test_two_folders_of_one_name_keep_their_own_caches(tmp_path, monkeypatch, isolated_cache):
    first = image_folder(tmp_path / "a" / "data", {"x": 2, "y": 2})
    second = image_folder(tmp_path / "b" / "data", {"u": 3, "v": 3})
    calls = _count_decodes(monkeypatch)
    for _ in range(2):
        assert load_dataset(str(first), "all", image_size=6, progress=False).class_names == ["x", "y"]
        assert load_dataset(str(second), "all", image_size=6, progress=False).class_names == ["u", "v"]
    assert calls[0] == 4 + 6  # each decoded once
    assert len(list((isolated_cache / "stores").iterdir())) == 2


def test_class_folder_without_images_is_named(tmp_path, caplog):
    root = image_folder(tmp_path / "mine", {"a": 2, "b": 2})
    (root / "c" / "nested").mkdir(parents=True)
    (root / "c" / "photo.heic").write_bytes(b"")
    with caplog.at_level("WARNING"):
        ds = load_dataset(str(root), "all", image_size=6, progress=False)
    assert ds.class_names == ["a", "b"]
    assert "'c' (nested/, photo.heic)" in caplog.text and "left out" in caplog.text
