"""Omniglot (Lake, Salakhutdinov and Tenenbaum, Science 2015): 1,623 handwritten
characters from 50 alphabets, 20 drawings each.

Read from the two official archives (``images_background.zip``,
``images_evaluation.zip``) in ``<data root>/omniglot/``, from the same folders
already extracted there, or downloaded on first use from the authors' public
address into the cache folder with the published MD5 checked. Archives are
read in place (members are decoded straight from the zip), so nothing is ever
written next to them.

Polarity: the PNGs are 1-bit with white paper and black ink; decoded images
are inverted so that ink is bright (1.0) on a dark (0.0) background, which
makes zero padding and max-pooling act on the strokes. No mean/std
normalisation is applied: pixel values are in [0, 1].
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from fewshot.data.download import Fetch, download
from fewshot.data.paths import ways_to_supply
from fewshot.data.sources.base import (
    Source,
    SourceClass,
    class_folders,
    file_identity,
    list_images,
    open_image,
    tree_identity,
)
from fewshot.errors import CorruptDataError, DataNotFoundError

PARTS = ("background", "evaluation")
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_{part}.zip"
MD5 = {
    "background": "68d2efa1b9178cc56df9314c21c6e718",
    "evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
EXPECTED = {"alphabets": 50, "characters": 1623, "drawings": 20, "background": 964, "evaluation": 659}


class OmniglotSource(Source):
    """Both Omniglot parts; class names are ``Alphabet/characterNN``.

    ``locations`` maps each part to its zip archive or extracted folder.
    ``part_of`` tells which part (background or evaluation) a class is from.
    """

    name = "omniglot"
    channels = 1
    invert = True

    def __init__(self, locations: dict[str, Path]) -> None:
        self.locations = locations
        self._classes: list[SourceClass] | None = None

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part, path in sorted(self.locations.items()):
            if path.is_dir():
                out[part] = tree_identity(_folder_files(path), path)
            else:
                out[part] = file_identity(path)
        return out

    def classes(self) -> list[SourceClass]:
        if self._classes is None:
            classes: list[SourceClass] = []
            for part in PARTS:
                path = self.locations[part]
                listing = _zip_listing(path) if path.is_file() else _folder_listing(path)
                if not listing:
                    raise CorruptDataError(
                        f"{path} holds no images in the Omniglot layout "
                        f"(images_{part}/<Alphabet>/<characterNN>/<id>_<drawer>.png)."
                    )
                for name, items in sorted(listing.items()):
                    classes.append(SourceClass(name, tuple((part, m) for m in sorted(items)), part))
            self._classes = classes
        return self._classes

    @contextmanager
    def reader(self) -> Iterator[dict[str, zipfile.ZipFile | None]]:
        with ExitStack() as stack:
            handles: dict[str, zipfile.ZipFile | None] = {}
            for part, path in self.locations.items():
                handles[part] = stack.enter_context(_open_zip(path)) if path.is_file() else None
            yield handles

    def open_item(self, handle: dict[str, zipfile.ZipFile | None], item: tuple[str, str]) -> Image.Image:
        part, member = item
        archive = handle[part]
        path = self.locations[part]
        if archive is None:
            return open_image(path / member, str(path / member))
        try:
            with archive.open(member) as f:
                data = f.read()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise CorruptDataError(
                f"Archive {path} is corrupt: member {member} cannot be read ({exc}). "
                "Replace the archive (or delete it to download a fresh copy)."
            ) from exc
        return open_image(io.BytesIO(data), f"{path}:{member}")

    def describe_item(self, item: tuple[str, str]) -> str:
        part, member = item
        return f"{self.locations[part]}:{member}"


@contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptDataError(
            f"Archive {path} is truncated or corrupt ({exc}). "
            "Replace it with a complete copy (or delete it to download a fresh one)."
        ) from exc
    with archive:
        yield archive


def _zip_listing(path: Path) -> dict[str, list[str]]:
    """Members grouped by ``Alphabet/characterNN`` (any top-level folder name)."""
    with _open_zip(path) as archive:
        names = archive.namelist()
    listing: dict[str, list[str]] = {}
    for member in names:
        parts = member.split("/")
        if len(parts) == 4 and parts[3].lower().endswith(".png"):
            listing.setdefault(f"{parts[1]}/{parts[2]}", []).append(member)
    return listing


def _folder_files(path: Path) -> list[Path]:
    return [f for a in class_folders(path) for c in class_folders(a) for f in list_images(c)]


def _folder_listing(path: Path) -> dict[str, list[str]]:
    listing: dict[str, list[str]] = {}
    for alphabet in class_folders(path):
        for character in class_folders(alphabet):
            files = list_images(character)
            if files:
                listing[f"{alphabet.name}/{character.name}"] = [f.relative_to(path).as_posix() for f in files]
    return listing


def candidate_locations(root: Path, part: str) -> list[Path]:
    """Where a part may lie under a data root: archive first, then extracted folder."""
    bases = [root / "omniglot", root]
    out = []
    for base in bases:
        out += [base / f"images_{part}.zip", base / f"images_{part}"]
    return out


def locate(
    data_root: Path | None,
    cache: Path,
    allow_download: bool = True,
    fetch: Fetch | None = None,
) -> OmniglotSource:
    """Find both Omniglot parts: data root, then earlier downloads, then download.

    Raises DataNotFoundError saying where it looked and the three ways to supply data.
    """
    download_dir = cache / "downloads" / "omniglot"
    locations: dict[str, Path] = {}
    looked: list[Path] = []
    for part in PARTS:
        candidates = (candidate_locations(data_root, part) if data_root else []) + [
            download_dir / f"images_{part}.zip"
        ]
        looked += candidates
        found = next((c for c in candidates if c.exists()), None)
        if found is not None:
            locations[part] = found
    missing = [p for p in PARTS if p not in locations]
    if missing and allow_download:
        for part in missing:
            try:
                locations[part] = download(
                    URL.format(part=part), download_dir / f"images_{part}.zip", MD5[part], fetch
                )
            except DataNotFoundError as exc:
                raise DataNotFoundError(
                    f"Omniglot archive images_{part}.zip not found and could not be downloaded "
                    f"({exc}).\n{ways_to_supply('Omniglot', looked)}"
                ) from exc
        missing = []
    if missing:
        raise DataNotFoundError(
            f"Omniglot archive(s) {', '.join(f'images_{p}.zip' for p in missing)} not found "
            f"(download disabled).\n{ways_to_supply('Omniglot', looked)}"
        )
    return OmniglotSource(locations)


def verify(source: OmniglotSource) -> list[str]:
    """Integrity report lines; raises CorruptDataError on any deviation from the dataset."""
    classes = source.classes()
    problems = []
    per_part = {p: sum(1 for c in classes if c.group == p) for p in PARTS}
    alphabets = {c.name.split("/")[0] for c in classes}
    if len(alphabets) != EXPECTED["alphabets"]:
        problems.append(f"{len(alphabets)} alphabets, expected {EXPECTED['alphabets']}")
    if len(classes) != EXPECTED["characters"]:
        problems.append(f"{len(classes)} characters, expected {EXPECTED['characters']}")
    for part in PARTS:
        if per_part[part] != EXPECTED[part]:
            problems.append(f"{per_part[part]} characters in {part}, expected {EXPECTED[part]}")
    short = [c for c in classes if len(c.items) != EXPECTED["drawings"]]
    for c in short[:5]:
        problems.append(f"character {c.name} has {len(c.items)} drawings, expected 20")
    lines = [
        f"{len(alphabets)} alphabets, {len(classes)} characters "
        f"({per_part['background']} background + {per_part['evaluation']} evaluation), "
        f"{sum(len(c.items) for c in classes)} images"
    ]
    lines += _checksums(source)
    if problems:
        raise CorruptDataError("Omniglot failed verification: " + "; ".join(problems))
    return lines


def _checksums(source: OmniglotSource) -> list[str]:
    """Check archives against a SHA256SUMS beside them, or the published MD5s."""
    lines = []
    for part, path in sorted(source.locations.items()):
        if not path.is_file():
            lines.append(f"{part}: extracted folder {path} (no archive checksum to check)")
            continue
        sums = path.parent / "SHA256SUMS"
        expected = None
        if sums.is_file():
            for row in sums.read_text().splitlines():
                fields = row.split()
                if len(fields) == 2 and fields[1].lstrip("*") == path.name:
                    expected = ("sha256", fields[0])
        if expected is None:
            expected = ("md5", MD5[part])
        digest = hashlib.new(expected[0])
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() == expected[1]:
            lines.append(f"{part}: {path.name} {expected[0].upper()} ok")
        elif expected[0] == "sha256":
            raise CorruptDataError(
                f"Archive {path} does not match {sums} "
                f"({digest.hexdigest()} != {expected[1]}): replace it with a good copy."
            )
        else:
            lines.append(
                f"{part}: {path.name} is not byte-identical to the published archive "
                "(a re-packed copy?); its contents were checked above"
            )
    return lines
