"""Decoded datasets: every image decoded once into uint8 tensors, cached on disk.

A store holds all images of a source as one uint8 array (M, C, H, W), class
by class, with ``offsets`` marking where each class starts. It is keyed by the
source's identity and the image size, so a changed source means a rebuild;
a cache that is missing, truncated or built from other files is never trusted.
Loading is one ``numpy.load`` (in memory, or memory-mapped for large data),
so a second run decodes no image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from fewshot.data.sources.base import Source

log = logging.getLogger(__name__)

FORMAT = 3
"""Bump when the decoded layout changes, so that old caches are rebuilt (3: EXIF turns, alpha, 16-bit)."""


@dataclass
class Store:
    """All images of one source at one size: ``images[offsets[c]:offsets[c+1]]`` is class c."""

    images: torch.Tensor
    offsets: np.ndarray
    class_names: list[str]
    key: str
    path: Path | None = None
    groups: list[str] | None = None

    def group(self, name: str) -> list[str]:
        """Names of the classes in a source group (an Omniglot part, a mini-ImageNet split)."""
        groups = self.groups or [""] * len(self.class_names)
        return [c for c, g in zip(self.class_names, groups, strict=True) if g == name]

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.class_names)

    def class_images(self, c: int) -> torch.Tensor:
        return self.images[int(self.offsets[c]) : int(self.offsets[c + 1])]


def store_key(source: Source, image_size: int) -> str:
    """Digest of everything the decoded images depend on."""
    recipe = {
        "format": FORMAT,
        "source": source.name,
        "identity": source.identity(),
        "size": image_size,
        "channels": source.channels,
        "invert": source.invert,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def eight_bit(image: Image.Image) -> Image.Image:
    """The image as it is displayed, in 8 bits a channel ("L" or "RGB" or "CMYK" ...).

    ``convert`` alone would show a photo sideways (it ignores the EXIF
    orientation a camera writes), turn a transparent background into the
    colour hidden under it (often black, so black ink vanishes), and clip
    16-bit grey (medical scans) to white instead of scaling it.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if image.mode.startswith("I;16"):
        grey = np.asarray(image, dtype=np.float64) * (255 / 65535)
        return Image.fromarray(np.rint(grey).astype(np.uint8), "L")
    return image


def decode(image: Image.Image, image_size: int, channels: int, invert: bool) -> np.ndarray:
    """One PIL image to a (C, size, size) uint8 array: the one decoding of training and prediction."""
    mode = "L" if channels == 1 else "RGB"
    image = eight_bit(image).convert(mode).resize((image_size, image_size), Image.Resampling.LANCZOS)
    arr = np.asarray(image, dtype=np.uint8)
    if invert:
        arr = 255 - arr
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def build(source: Source, image_size: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every image of ``source``; returns (images, offsets, class names).

    Decoding is the slow part of a first run (about 6 s for all of Omniglot
    here); it happens once per source and size.
    """
    classes = source.classes()
    total = sum(len(c.items) for c in classes)
    images = np.empty((total, source.channels, image_size, image_size), dtype=np.uint8)
    offsets = np.zeros(len(classes) + 1, dtype=np.int64)
    i = 0
    with (
        source.reader() as handle,
        tqdm(
            total=total, desc=f"decoding {source.name}", unit="img", disable=None if progress else True
        ) as bar,
    ):
        for c, cls in enumerate(classes):
            for item in cls.items:
                image = source.open_item(handle, item)
                images[i] = decode(image, image_size, source.channels, source.invert)
                i += 1
            offsets[c + 1] = i
            bar.update(len(cls.items))
    return images, offsets, classes


def _store_dir(cache: Path, source: Source, image_size: int, key: str) -> Path:
    return cache / "stores" / f"{source.cache_name()}-{image_size}px-{key[:16]}"


def _read(folder: Path, key: str, mmap: bool) -> Store | None:
    """The cached store in ``folder`` if it is complete and matches ``key``, else None."""
    meta_path, images_path = folder / "meta.json", folder / "images.npy"
    if not meta_path.is_file() or not images_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key or meta.get("format") != FORMAT:
            log.warning("cache %s was built from other files; rebuilding", folder)
            return None
        images = np.load(images_path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        log.warning("cache %s is unreadable (%s); rebuilding", folder, exc)
        return None
    if list(images.shape) != meta["shape"]:
        log.warning("cache %s has shape %s, expected %s; rebuilding", folder, images.shape, meta["shape"])
        return None
    offsets = np.asarray(meta["offsets"], dtype=np.int64)
    tensor = _mmap_tensor(images) if mmap else torch.from_numpy(images)
    return Store(tensor, offsets, list(meta["classes"]), key, folder, list(meta["groups"]))


def _mmap_tensor(images: np.ndarray) -> torch.Tensor:
    """Wrap a read-only memory map without copying (torch warns on read-only arrays)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(images)


def _write(folder: Path, images: np.ndarray, offsets: np.ndarray, classes: list, key: str) -> None:
    """Write a store atomically: a temporary folder renamed into place when complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        np.save(tmp / "images.npy", images)
        meta = {
            "format": FORMAT,
            "key": key,
            "shape": list(images.shape),
            "offsets": offsets.tolist(),
            "classes": [c.name for c in classes],
            "groups": [c.group for c in classes],
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_store(
    source: Source,
    image_size: int,
    cache: Path,
    mmap: bool = False,
    progress: bool = True,
) -> Store:
    """The decoded store of ``source`` at ``image_size``: from the cache, else built and cached."""
    key = store_key(source, image_size)
    folder = _store_dir(cache, source, image_size, key)
    store = _read(folder, key, mmap)
    if store is not None:
        return store
    images, offsets, classes = build(source, image_size, progress)
    _write(folder, images, offsets, classes, key)
    _remove_stale(folder)
    store = _read(folder, key, mmap)
    assert store is not None, f"store just written to {folder} cannot be read back"
    return store


def _remove_stale(folder: Path) -> None:
    """Delete caches of the same source and size built from older files."""
    prefix = folder.name.rsplit("-", 1)[0] + "-"
    for other in folder.parent.iterdir():
        if other != folder and other.is_dir() and other.name.startswith(prefix):
            shutil.rmtree(other, ignore_errors=True)
