"""Few-shot datasets: a decoded store seen through one split's list of classes.

A dataset class is a store class plus a rotation (Omniglot's Vinyals split
counts each character rotated by 0/90/180/270 degrees as its own class), so
rotation augmentation costs no memory. ``load_dataset`` is the one entry point
that turns a dataset name and split into something episodes can be drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from fewshot.data import paths
from fewshot.data.download import Fetch
from fewshot.data.sources import miniimagenet, omniglot
from fewshot.data.sources.base import Source, class_folders, is_image_file
from fewshot.data.sources.folder import FolderSource
from fewshot.data.store import Store, load_store
from fewshot.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fewshot.errors import DataNotFoundError, FewShotError

ROTATIONS = (0, 90, 180, 270)
ROTATION_NAMES = tuple(f"rot{r:03d}" for r in ROTATIONS)
"""How a class name says its rotation: ``Alphabet/characterNN/rot090``."""
_ROTATION_SUFFIXES = tuple(f"/{r}" for r in ROTATION_NAMES)


def rotated_classes(characters: list[str]) -> list[str]:
    """Each character as four classes, one per rotation, in the Vinyals files' order."""
    return [f"{c}/{r}" for c in characters for r in ROTATION_NAMES]


def _rotated_twice(name: str, split: str, example: str) -> FewShotError:
    """The error for adding rotations to a split that already has them as classes."""
    return FewShotError(
        f"{name} split {split!r} already has rotations as classes ({example}), so rotations=True "
        "(the config's data.rotations) would give every class several labels; leave data.rotations "
        "off for this split, or use the 'background' or 'evaluation' split to add rotations."
    )


@dataclass
class FewShotDataset:
    """One split of a dataset: ``classes`` index the store, ``rotations`` are quarter turns."""

    name: str
    split: str
    store: Store
    store_class: np.ndarray
    rotation: np.ndarray
    class_names: list[str]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    invert: bool = False

    @property
    def preprocess(self) -> dict[str, object]:
        """What turns a raw image file into this dataset's input tensor (for prediction)."""
        c, h, _ = self.image_shape
        return {
            "image_size": h,
            "channels": c,
            "invert": self.invert,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
        }

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.store.image_shape

    @property
    def counts(self) -> np.ndarray:
        """Images per dataset class."""
        return self.store.counts[self.store_class]

    @property
    def num_images(self) -> int:
        return int(self.counts.sum())

    def with_rotations(self) -> FewShotDataset:
        """Each class four times, rotated by 0/90/180/270 degrees: 4x the classes.

        Refused for a split whose classes already are rotations (Omniglot's Vinyals
        splits): rotating again would put one class under several labels.
        """
        rotated = [
            n
            for n, r in zip(self.class_names, self.rotation, strict=True)
            if r or n.endswith(_ROTATION_SUFFIXES)
        ]
        if rotated:
            raise _rotated_twice(self.name, self.split, f"e.g. {rotated[0]!r}")
        k = np.arange(4)
        return replace(
            self,
            store_class=np.repeat(self.store_class, 4),
            rotation=(np.repeat(self.rotation, 4) + np.tile(k, self.num_classes)) % 4,
            class_names=[f"{n}/rot{90 * int(r):03d}" for n in self.class_names for r in k],
        )

    def flat_images(self, max_bytes: int = 2**30) -> tuple[torch.Tensor, np.ndarray] | None:
        """All images of this split with rotations applied, and each class's first row.

        Rotating once here instead of per episode is what makes sampling fast;
        returns None (rotate per episode instead) if the copy would exceed ``max_bytes``.
        """
        if not self.rotation.any():
            return self.store.images, self.store.offsets[self.store_class]
        nbytes = int(self.counts.sum()) * int(np.prod(self.image_shape))
        if nbytes > max_bytes:
            return None
        images = torch.cat([self.class_images(c) for c in range(self.num_classes)])
        starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        return images, starts

    def class_images(self, c: int) -> torch.Tensor:
        """All images of dataset class c, rotated (uint8)."""
        images = self.store.class_images(int(self.store_class[c]))
        k = int(self.rotation[c])
        return torch.rot90(images, k, dims=(-2, -1)) if k else images


def _subset(name: str, split: str, store: Store, names: list[str], **norm) -> FewShotDataset:
    """The split whose classes are the store classes called ``names``.

    Store class names must be unique: a split must never pick up another
    split's class of the same name.
    """
    index: dict[str, int] = {}
    for i, n in enumerate(store.class_names):
        if n in index:
            groups = store.groups or [""] * len(store)
            where = f" (in {groups[index[n]]!r} and {groups[i]!r})" if groups[i] else ""
            raise FewShotError(
                f"{name} has two classes named {n!r}{where}, so split {split!r} cannot tell them apart; "
                "give every class a unique name (a class belongs to one split)."
            )
        index[n] = i
    missing = [n for n in names if n not in index]
    if missing:
        raise DataNotFoundError(
            f"{name} split {split!r} lists {len(missing)} classes that the data does not have, "
            f"e.g. {missing[0]!r}."
        )
    return FewShotDataset(
        name=name,
        split=split,
        store=store,
        store_class=np.array([index[n] for n in names], dtype=np.int64),
        rotation=np.zeros(len(names), dtype=np.int64),
        class_names=list(names),
        **norm,
    )


VINYALS_SPLITS = ("train", "val", "test", "trainval")
OMNIGLOT_SPLITS = ("background", "evaluation", *VINYALS_SPLITS)
DATASETS = {
    "omniglot": "Omniglot (Lake et al. 2015): 1,623 characters x 20 drawings, 28x28 gray. "
    "Splits: background, evaluation (Lake), train/val/test/trainval (Vinyals, rotations as classes), "
    "or a .txt file of classes.",
    "miniimagenet": "mini-ImageNet (Vinyals et al. 2016), Ravi & Larochelle split: 64/16/20 classes "
    "x 600 images, 84x84 RGB. Splits: train, val, test.",
    "folder:DIR": "Your own images: DIR/<class>/<images>; split 'all', or DIR/{train,val,test}/<class>/.",
}
FOLDER_SPLITS = ("train", "val", "test")


def vinyals_characters(data_root: Path | None, split: str) -> list[str]:
    """The Vinyals split as class names with rotations, from the data root or the packaged copy."""
    parts = ("train", "val") if split == "trainval" else (split,)
    if data_root is not None:
        folder = next(
            (
                f
                for f in (data_root / "omniglot" / "splits" / "vinyals", data_root / "splits" / "vinyals")
                if f.is_dir()
            ),
            None,
        )
        if folder is not None:
            lines = []
            for part in parts:
                lines += (folder / f"{part}.txt").read_text(encoding="utf-8-sig").split()
            return lines
    packaged = resources.files("fewshot.data") / "splits" / "omniglot_vinyals"
    chars = [c for part in parts for c in (packaged / f"{part}.txt").read_text(encoding="utf-8-sig").split()]
    return rotated_classes(chars)


def _split_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of a split file's non-blank lines; a UTF-8 byte-order mark is dropped."""
    text = path.read_text(encoding="utf-8-sig")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def class_list(path: Path) -> list[str]:
    """The classes of a split file as ``Alphabet/characterNN/rotDDD`` (no rotation given: ``rot000``).

    The file has one ``Alphabet/characterNN`` or ``Alphabet/characterNN/rotDDD`` per line.

    Lets an Omniglot run use any character split (another paper's, a random
    one) without code: ``data.train_split=my_splits/train.txt``.
    """
    if not path.is_file():
        raise DataNotFoundError(
            f"Split file {path} does not exist. Give a named split "
            f"({', '.join(OMNIGLOT_SPLITS)}) or an existing .txt file of classes, one per line."
        )
    lines = _split_lines(path)
    if not lines:
        raise DataNotFoundError(f"Split file {path} lists no classes; write one class per line.")
    seen: dict[str, int] = {}  # class -> line number, in file order
    for n, line in lines:
        parts = line.split("/")
        bad_rotation = len(parts) == 3 and parts[2] not in ROTATION_NAMES
        if len(parts) not in (2, 3) or bad_rotation:
            raise FewShotError(
                f"{path} line {n}: {line!r} is not a class; write Alphabet/characterNN, optionally "
                "followed by /rot000, /rot090, /rot180 or /rot270."
            )
        key = line if len(parts) == 3 else f"{line}/rot000"
        if key in seen:  # one class under two labels would make episodes silently wrong
            raise FewShotError(f"{path} line {n}: {line!r} repeats line {seen[key]}; list each class once.")
        seen[key] = n
    return list(seen)


def _omniglot_classes(split: str, data_root: Path | None) -> list[str] | None:
    """The classes (``Alphabet/characterNN/rotDDD``) a split lists; None for a whole archive.

    Read before the image store is built, so a bad split file is reported at once.
    """
    if split in ("background", "evaluation"):
        return None
    return vinyals_characters(data_root, split) if split in OMNIGLOT_SPLITS else class_list(Path(split))


def _rotated_split(split: str, lines: list[str]) -> list[str]:
    """A split of plain characters as four rotated classes per character (as the Vinyals splits).

    Refused if the split already lists rotations as classes: rotating them again
    would put one class under several labels.
    """
    if split in OMNIGLOT_SPLITS:
        example = next((line for line in lines if not line.endswith("/rot000")), lines[0])
        raise _rotated_twice("omniglot", split, f"e.g. {example!r}")
    listed = [(n, line) for n, line in _split_lines(Path(split)) if line.count("/") == 2]
    if listed:
        n, line = next(((n, line) for n, line in listed if not line.endswith("/rot000")), listed[0])
        raise _rotated_twice("omniglot", split, f"line {n}: {line!r}")
    return rotated_classes([line.removesuffix("/rot000") for line in lines])


def _omniglot(split: str, lines: list[str] | None, store: Store) -> FewShotDataset:
    if lines is None:
        return _subset("omniglot", split, store, store.group(split), invert=True)
    chars = [line.rsplit("/", 1)[0] for line in lines]
    ds = _subset("omniglot", split, store, chars)
    ds.rotation = np.array([int(line.rsplit("rot", 1)[1]) // 90 for line in lines], dtype=np.int64)
    ds.invert = True
    ds.class_names = lines
    return ds


def source_for(
    name: str,
    data_root: str | Path | None = None,
    cache: str | Path | None = None,
    download: bool = True,
    fetch: Fetch | None = None,
    channels: int = 3,
) -> Source:
    """The source behind a dataset name (``omniglot``, ``miniimagenet``, ``folder:DIR`` or a folder)."""
    root = paths.data_root(data_root)
    if name == "omniglot":
        return omniglot.locate(root, paths.cache_root(cache), download, fetch)
    if name == "miniimagenet":
        return miniimagenet.locate(root)
    folder = Path(name.removeprefix("folder:"))
    if name.startswith("folder:") or folder.is_dir():
        return FolderSource(folder, channels=channels)
    raise FewShotError(
        f"Unknown dataset {name!r}. Known: omniglot, miniimagenet, or folder:DIR for a folder "
        "of class folders (see `fewshot datasets list`)."
    )


def load_dataset(
    name: str,
    split: str,
    data_root: str | Path | None = None,
    cache: str | Path | None = None,
    image_size: int | None = None,
    download: bool = True,
    rotations: bool = False,
    mmap: bool = False,
    channels: int = 3,
    fetch: Fetch | None = None,
    progress: bool = True,
) -> FewShotDataset:
    """A split of a dataset, decoded (once, then from the cache) and ready for episodes.

    ``rotations=True`` adds the 90/180/270-degree rotations of every class as
    new classes; it is an error for a split that already has them (Omniglot's
    Vinyals splits, a split file listing ``/rotDDD`` classes).
    """
    source = source_for(name, data_root, cache, download, fetch, channels)
    root = paths.data_root(data_root)
    if name == "omniglot":
        if split not in OMNIGLOT_SPLITS and not split.lower().endswith(".txt"):
            raise FewShotError(
                f"Omniglot has no split {split!r}; choose one of {', '.join(OMNIGLOT_SPLITS)}, "
                "or give a .txt file of classes (one Alphabet/characterNN[/rotDDD] per line)."
            )
        lines = _omniglot_classes(split, root)
        if rotations and lines is not None:  # checked and expanded before any image is decoded
            lines, rotations = _rotated_split(split, lines), False
        store = load_store(source, image_size or 28, paths.cache_root(cache), mmap, progress)
        ds = _omniglot(split, lines, store)
    elif name == "miniimagenet":
        if split not in miniimagenet.SPLITS:
            raise FewShotError(f"mini-ImageNet has no split {split!r}; choose train, val or test.")
        store = load_store(source, image_size or 84, paths.cache_root(cache), mmap, progress)
        ds = _subset("miniimagenet", split, store, store.group(split), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    else:
        ds = _folder_dataset(source, split, image_size or 84, cache, mmap, progress)  # type: ignore[arg-type]
    return ds.with_rotations() if rotations else ds


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` has an image file directly inside (stops at the first)."""
    return any(is_image_file(p) for p in folder.iterdir())


def _hold(folders: list[str]) -> str:
    """``train/ holds`` or ``bus/, train/ hold``: the subject of an error message."""
    return ", ".join(f"{f}/" for f in folders) + (" holds" if len(folders) == 1 else " hold")


def folder_splits(root: Path) -> tuple[str, ...]:
    """The splits of a user's folder: its train/val/test folders, or ``("all",)`` for class folders.

    A class may itself be called train, val or test (bus/, car/, train/), so a
    sub-folder is a split folder only if it holds class folders, and the root has
    split folders only if none of its sub-folders holds images directly; a folder
    that looks like both is an error naming the clash.
    """
    present = [d for d in FOLDER_SPLITS if (root / d).is_dir()]
    if not present:
        return ("all",)
    as_split = [d for d in present if any(_holds_images(c) for c in class_folders(root / d))]
    as_class = [d.name for d in class_folders(root) if _holds_images(d)]
    if as_split and as_class:
        raise FewShotError(
            f"{root} mixes two layouts: {_hold(as_split)} class folders (a train/val/test split) "
            f"but {_hold(as_class)} images directly (a class); make it one layout: every class folder "
            "inside train/, val/ or test/, or a plain folder of classes each holding its images directly."
        )
    return ("all",) if as_class else tuple(present)


def _folder_dataset(
    source: FolderSource, split: str, image_size: int, cache, mmap: bool, progress: bool
) -> FewShotDataset:
    """A folder dataset: ``all`` classes, or the classes of a train/val/test sub-folder."""
    splits = folder_splits(source.root)
    if splits != ("all",):
        if split not in splits:
            raise FewShotError(f"{source.root} has split folders {', '.join(splits)}; no {split!r} split.")
        source = FolderSource(source.root / split, source.channels, f"{source.name}-{split}")
    elif split != "all":
        classes = [d for d in FOLDER_SPLITS if (source.root / d).is_dir() and _holds_images(source.root / d)]
        if classes:
            raise FewShotError(
                f"{source.root} has no {split!r} split: it is a folder of class folders (one split, "
                f"'all'), as {_hold(classes)} images directly (a class, not a split folder); "
                "use split 'all', or put class folders inside train/, val/ and test/."
            )
        raise FewShotError(
            f"{source.root} has no {split!r} sub-folder: a folder of class folders has the one split "
            "'all'; to use train/val/test, make sub-folders train/, val/, test/ each holding class folders."
        )
    store = load_store(source, image_size, paths.cache_root(cache), mmap, progress)
    norm = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD} if source.channels == 3 else {}
    return _subset(source.name, split, store, list(store.class_names), **norm)
