"""A folder of class folders: the format for users' own images.

``root/<class name>/<image files>``; any format Pillow reads. Used for
few-shot recognition on one's own data (medical images, defect inspection)
and as the support set of ``fewshot predict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from fewshot.data.sources.base import (
    Source,
    SourceClass,
    class_folders,
    list_images,
    open_image,
    tree_identity,
)
from fewshot.errors import DataNotFoundError


class FolderSource(Source):
    """Classes are the sub-folders of ``root`` (sorted by name); items are their images."""

    def __init__(self, root: Path, channels: int = 3, name: str | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataNotFoundError(f"Image folder {root} does not exist or is not a folder.")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.root = root
        self.channels = channels
        self.name = name or f"folder-{root.name}"
        self._classes: list[SourceClass] | None = None

    def classes(self) -> list[SourceClass]:
        if self._classes is None:
            folders = class_folders(self.root)
            classes = [SourceClass(f.name, tuple(list_images(f))) for f in folders]
            classes = [c for c in classes if c.items]
            if not classes:
                raise DataNotFoundError(
                    f"{self.root} has no class folders with images: expected "
                    f"{self.root}/<class name>/<image files (png, jpg, ...)>."
                )
            self._classes = classes
        return self._classes

    def identity(self) -> dict[str, Any]:
        files = [p for c in self.classes() for p in c.items]
        return {"root": self.root.name, **tree_identity(files, self.root)}

    def open_item(self, handle: Any, item: Path) -> Image.Image:
        return open_image(item, str(item))
