"""Tiny datasets in the real on-disk formats, generated per test."""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def glyph(seed: int, size: int = 105) -> Image.Image:
    """A 1-bit image in Omniglot's polarity: white paper, a few black strokes."""
    rng = np.random.default_rng(seed)
    img = np.ones((size, size), dtype=bool)
    for _ in range(3):
        r, c = rng.integers(10, size - 30, 2)
        if rng.random() < 0.5:
            img[r : r + 4, c : c + 25] = False
        else:
            img[r : r + 25, c : c + 4] = False
    return Image.fromarray(img)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def omniglot_zip(path: Path, part: str, alphabets: dict[str, int], drawings: int = 20) -> Path:
    """An ``images_<part>.zip`` in the official layout with the given characters per alphabet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"images_{part}/", "")
        for a, (alphabet, chars) in enumerate(sorted(alphabets.items())):
            for c in range(1, chars + 1):
                for d in range(1, drawings + 1):
                    name = f"images_{part}/{alphabet}/character{c:02d}/{a:02d}{c:02d}_{d:02d}.png"
                    z.writestr(name, png_bytes(glyph(zlib.crc32(f"{part}/{alphabet}/{c}".encode()) + d)))
    return path


def omniglot_root(root: Path, drawings: int = 20) -> Path:
    """A data root with a small Omniglot: 2+1 background alphabets, 1 evaluation alphabet."""
    omniglot_zip(root / "omniglot" / "images_background.zip", "background", {"Alpha": 3, "Beta": 2}, drawings)
    omniglot_zip(root / "omniglot" / "images_evaluation.zip", "evaluation", {"Gamma": 2}, drawings)
    return root


def image_folder(root: Path, classes: dict[str, int], size: int = 12, fmt: str = "png") -> Path:
    """``root/<class>/<i>.<fmt>`` RGB images, one random colour pattern per class."""
    for c, (name, count) in enumerate(sorted(classes.items())):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng(1000 * c + i)
            arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{i:03d}.{fmt}")
    return root


def miniimagenet_root(root: Path, per_class: int = 4, size: int = 16) -> Path:
    """``miniimagenet/images`` + Ravi-style train/val/test CSVs with 3/2/2 classes."""
    folder = root / "miniimagenet"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    splits = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}
    for split, labels in splits.items():
        rows = ["filename,label"]
        for c, label in enumerate(labels):
            for i in range(per_class):
                name = f"{label}{i:08d}.jpg"
                arr = np.full((size, size, 3), 40 * c + i, dtype=np.uint8)
                Image.fromarray(arr).save(folder / "images" / name)
                rows.append(f"{name},{label}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def engine_dataset(root: Path) -> Path:
    """The engine tests' tiny folder dataset: train/val/test of 6/4/4 classes, 6 16x16 images each."""
    image_folder(root / "train", {f"t{i}": 6 for i in range(6)}, size=16)
    image_folder(root / "val", {f"v{i}": 6 for i in range(4)}, size=16)
    image_folder(root / "test", {f"s{i}": 6 for i in range(4)}, size=16)
    return root


def engine_config(tmp_path: Path, root: Path, method: dict, **sections: dict) -> Path:
    """A tiny 3-way 1-shot run on ``root`` written to ``tmp_path/<method>.yaml``; ``sections``
    update the config's sections (``train={"steps": 2}``)."""
    config = {
        "name": f"tiny-{method['name']}",
        "data": {"dataset": f"folder:{root}", "image_size": 16},
        "method": {"backbone": "conv4-32", **method},
        "train_episode": {"ways": 3, "shots": 1, "queries": 2},
        "train": {
            "steps": 4,
            "meta_batch": 2,
            "val_every": 2,
            "val_episodes": 4,
            "checkpoint_every": 2,
            "log_every": 1,
        },
        "eval": {"episodes": 6, "queries": 2, "chunk": 4},
    }
    for key, value in sections.items():
        config[key].update(value)
    path = tmp_path / f"{method['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
