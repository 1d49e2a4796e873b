"""A folder of class folders: the format for users' own images.

``root/<class name>/<image files>``; any format Pillow reads. Used for
few-shot recognition on one's own data (medical images, defect inspection)
and as the support set of ``fewshot predict``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from fewshot.data.sources.base import (
    IMAGE_SUFFIXES,
    Source,
    SourceClass,
    class_folders,
    list_images,
    open_image,
    tree_identity,
)
from fewshot.errors import DataNotFoundError

log = logging.getLogger(__name__)


class FolderSource(Source):
    """Classes are the sub-folders of ``root`` (sorted by name); items are their images.

    A sub-folder without images is left out with a warning, or with
    ``strict`` (a support set, where every folder is a class the user
    expects) is an error.
    """

    def __init__(self, root: Path, channels: int = 3, name: str | None = None, strict: bool = False) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataNotFoundError(f"Image folder {root} does not exist or is not a folder.")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.root = root
        self.channels = channels
        self.name = name or f"folder-{root.name}"
        self._classes: list[SourceClass] | None = None
        self.strict = strict

    def classes(self) -> list[SourceClass]:
        if self._classes is None:
            folders = class_folders(self.root)
            classes = [SourceClass(f.name, tuple(list_images(f))) for f in folders]
            imageless = [f for f, c in zip(folders, classes, strict=True) if not c.items]
            if imageless and self.strict:
                raise DataNotFoundError(f"{self.root}: {describe_imageless(imageless)}")
            if imageless:
                log.warning("%s: left out, %s", self.root, describe_imageless(imageless))
            classes = [c for c in classes if c.items]
            if not classes:
                raise DataNotFoundError(
                    f"{self.root} has no class folders with images: expected "
                    f"{self.root}/<class name>/<image files (png, jpg, ...)>."
                )
            self._classes = classes
        return self._classes

    def cache_name(self) -> str:
        """The name and a digest of the full path: two folders both called "data" keep two caches."""
        digest = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:8]
        return f"{self.name}-{digest}"

    def identity(self) -> dict[str, Any]:
        files = [p for c in self.classes() for p in c.items]
        return {"root": self.root.name, **tree_identity(files, self.root)}

    def open_item(self, handle: Any, item: Path) -> Image.Image:
        return open_image(item, str(item))


def describe_imageless(folders: list[Path]) -> str:
    """Class folders that hold no image file, what they hold instead, and the fix."""
    parts = []
    for folder in folders:
        found = sorted(
            p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith(".")
        )
        parts.append(
            f"{folder.name!r} ({', '.join(found[:3]) + (', ...' if len(found) > 3 else '') or 'empty'})"
        )
    return (
        f"class folder(s) {'; '.join(parts)} hold no image file directly inside. Put each class's images "
        f"({', '.join(IMAGE_SUFFIXES)}) straight in its folder, or remove the folder."
    )
