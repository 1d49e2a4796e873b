"""mini-ImageNet (Vinyals et al. 2016) in the split of Ravi and Larochelle (2017).

Layout: ``<data root>/miniimagenet/images/<filename>.jpg`` and the split CSVs
(``filename,label`` rows) either beside ``images/`` (``train.csv`` ...) or in
``splits/ravi/``. 64/16/20 classes of 600 images; decoded to 84x84 RGB and
normalised with the ImageNet channel mean and standard deviation.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from PIL import Image

from fewshot.data.paths import ways_to_supply
from fewshot.data.sources.base import Source, SourceClass, file_identity, open_image, tree_identity
from fewshot.errors import CorruptDataError, DataNotFoundError

SPLITS = ("train", "val", "test")


def split_csv(folder: Path, split: str) -> Path | None:
    for candidate in (folder / f"{split}.csv", folder / "splits" / "ravi" / f"{split}.csv"):
        if candidate.is_file():
            return candidate
    return None


def _rows(path: Path) -> list[tuple[int, str, str]]:
    """(line number, filename, label) of a split CSV, fields stripped and blank rows skipped.

    Stray spaces or a byte-order mark must not make ``n01 `` a class of its own.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        rows = [(reader.line_num, [c.strip() for c in row]) for row in reader if any(c.strip() for c in row)]
    if not rows or rows[0][1] != ["filename", "label"]:
        raise CorruptDataError(f"{path} must start with the header 'filename,label'.")
    for lineno, row in rows[1:]:
        if len(row) != 2 or not all(row):
            raise CorruptDataError(
                f"{path}, line {lineno}: expected 'filename,label', got {','.join(row)!r}."
            )
    return [(lineno, row[0], row[1]) for lineno, row in rows[1:]]


class MiniImageNetSource(Source):
    """All classes of the three split CSVs (train, val, test order), grouped by split."""

    name = "miniimagenet"
    channels = 3

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.images = folder / "images"
        self._classes: list[SourceClass] | None = None

    def _csvs(self) -> dict[str, Path]:
        out = {}
        for split in SPLITS:
            path = split_csv(self.folder, split)
            if path is None:
                raise DataNotFoundError(
                    f"mini-ImageNet split file {split}.csv not found in {self.folder} "
                    f"or {self.folder / 'splits' / 'ravi'}."
                )
            out[split] = path
        return out

    def classes(self) -> list[SourceClass]:
        if self._classes is None:
            classes: list[SourceClass] = []
            seen_files: dict[str, tuple[Path, int]] = {}  # filename -> (CSV, line) first listing it
            seen_labels: dict[str, Path] = {}  # label -> the CSV that has it
            for split, path in self._csvs().items():
                by_label: dict[str, list[Path]] = {}
                for lineno, filename, label in _rows(path):
                    if filename in seen_files:
                        first, n = seen_files[filename]
                        raise CorruptDataError(
                            f"{path}, line {lineno}: image {filename!r} is listed again (first in "
                            f"{first} line {n}); list each image once, in one class of one split."
                        )
                    seen_files[filename] = (path, lineno)
                    other = seen_labels.get(label, path)
                    if other != path:
                        raise CorruptDataError(
                            f"{path}, line {lineno}: label {label!r} is also a class of {other}; a class "
                            "belongs to one split, so remove its rows from one of the two files."
                        )
                    seen_labels[label] = path
                    by_label.setdefault(label, []).append(self.images / filename)
                for label, files in sorted(by_label.items()):
                    classes.append(SourceClass(label, tuple(files), split))
            missing = [p for c in classes for p in c.items[:1] if not p.is_file()]
            if missing:
                raise DataNotFoundError(
                    f"mini-ImageNet image {missing[0]} listed in the split CSVs is missing "
                    f"({len(missing)} classes affected). Put the images in {self.images}/."
                )
            self._classes = classes
        return self._classes

    def identity(self) -> dict[str, Any]:
        files = [p for c in self.classes() for p in c.items]
        csvs = {s: file_identity(p) for s, p in self._csvs().items()}
        return {"csv": csvs, **tree_identity(files, self.folder)}

    def open_item(self, handle: Any, item: Path) -> Image.Image:
        if not item.is_file():
            raise DataNotFoundError(f"mini-ImageNet image {item} is missing.")
        return open_image(item, str(item))


def locate(data_root: Path | None) -> MiniImageNetSource:
    looked = []
    if data_root is not None:
        for folder in (data_root / "miniimagenet", data_root):
            looked.append(folder / "images")
            if (folder / "images").is_dir() and split_csv(folder, "train") is not None:
                return MiniImageNetSource(folder)
    raise DataNotFoundError(
        "mini-ImageNet images not found (ImageNet's licence forbids downloading them for you: "
        "place them in <data root>/miniimagenet/images/ with the Ravi split CSVs).\n"
        + ways_to_supply("mini-ImageNet", looked)
    )
