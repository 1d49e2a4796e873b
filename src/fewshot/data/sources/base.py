"""The small interface every dataset source implements: classes -> items.

A source knows where its files are and how to decode one item into a PIL
image; it knows nothing of episodes, caches or methods. Its ``identity`` is
what the store's cache key is made of, so a changed file means a rebuilt cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from fewshot.errors import CorruptDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class SourceClass:
    """One class of a source: its name, the items (file references) it holds, and
    the group it belongs to (Omniglot's part, mini-ImageNet's split), if any."""

    name: str
    items: tuple[Any, ...]
    group: str = ""


class Source(ABC):
    """A dataset on disk: an ordered list of classes, each an ordered list of items.

    ``channels`` is 1 (grayscale) or 3 (RGB); ``invert`` flips polarity after
    decoding (Omniglot: ink becomes bright on a dark background).
    """

    name: str = "source"
    channels: int = 3
    invert: bool = False

    @abstractmethod
    def classes(self) -> list[SourceClass]:
        """All classes in a fixed order (the store's class order)."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """A JSON-able description of the files; it changes whenever they change."""

    @contextmanager
    def reader(self) -> Iterator[Any]:
        """Open what reading items needs (e.g. zip archives) for the duration of a build."""
        yield None

    @abstractmethod
    def open_item(self, handle: Any, item: Any) -> Image.Image:
        """Decode one item with the handle from ``reader``; errors name the file."""

    def describe_item(self, item: Any) -> str:
        return str(item)

    def cache_name(self) -> str:
        """The name of this source's cache folders: one source, one name (stale ones are replaced)."""
        return self.name


def file_identity(path: Path) -> dict[str, Any]:
    """Name, size and modification time: cheap, and changes when the file does."""
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def open_image(fileobj: Any, where: str) -> Image.Image:
    """Open and fully decode an image, turning any decoding failure into a named error."""
    try:
        image = Image.open(fileobj)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CorruptDataError(
            f"Cannot read image {where}: {exc}. Replace or remove this file and run again."
        ) from exc
    return image


def is_image_file(path: Path) -> bool:
    """A visible file with an image suffix: what a class folder's items are."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name, hidden files skipped."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def class_folders(root: Path) -> list[Path]:
    """Visible sub-folders of ``root`` sorted by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def hidden(path: Path, root: Path) -> bool:
    """Whether ``path`` is or lies in a hidden entry below ``root`` (``.DS_Store``, ``.git/``)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def tree_identity(files: list[Path], root: Path) -> dict[str, Any]:
    """Identity of many files: a digest of (relative path, size, mtime) rows."""
    import hashlib

    digest = hashlib.sha256()
    for p in files:
        st = p.stat()
        digest.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"files": len(files), "digest": digest.hexdigest()}


__all__ = [
    "IMAGE_SUFFIXES",
    "Source",
    "SourceClass",
    "class_folders",
    "file_identity",
    "hidden",
    "is_image_file",
    "list_images",
    "open_image",
    "tree_identity",
]
