"""Few-shot prediction on a user's own images: support folder in, labelled queries out.

Class names are the support folder's sub-folders; every image (support and
query) goes through the same decoding and normalisation as the training
data (size, channels, polarity, mean/std, all recorded in the checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewshot.data.sources.base import hidden, is_image_file, open_image
from fewshot.data.sources.folder import FolderSource
from fewshot.data.store import decode
from fewshot.data.transforms import to_float
from fewshot.engine.runs import check_ways
from fewshot.errors import DataNotFoundError, FewShotError
from fewshot.methods.base import Method


@dataclass
class Prediction:
    path: str
    label: str
    probability: float
    probabilities: dict[str, float]


def load_image(path: Path, preprocess: dict[str, Any]) -> torch.Tensor:
    """Decode one file exactly as the training data was decoded: (C, H, W) float."""
    arr = decode(
        open_image(path, str(path)),
        int(preprocess["image_size"]),
        int(preprocess["channels"]),
        bool(preprocess.get("invert")),
    )
    mean, std = preprocess.get("mean"), preprocess.get("std")
    return to_float(torch.from_numpy(arr.copy()), tuple(mean) if mean else None, tuple(std) if std else None)


def query_files(paths: list[str]) -> list[Path]:
    """Query images: files as given, folders expanded to the images inside them."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if is_image_file(f) and not hidden(f, p))
        elif p.is_file():
            out.append(p)
        else:
            raise DataNotFoundError(f"Query image {p} does not exist.")
    if not out:
        raise DataNotFoundError(f"No query images in {', '.join(paths)}.")
    return out


def predict(
    method: Method, preprocess: dict[str, Any], support_dir: str | Path, queries: list[str]
) -> list[Prediction]:
    """Adapt ``method`` to the support folder and label every query image.

    ``preprocess`` is a loaded run's (``LoadedRun.preprocess``): its ``task`` and
    ``head_ways`` let a model that cannot take the support folder be refused up front.
    """
    task = preprocess.get("task", "classification")
    if task != "classification":
        raise FewShotError(
            f"This {method.name} checkpoint was trained on {task} tasks, but predict is for image "
            "classification; evaluate it with `fewshot eval`, or predict with a checkpoint trained on images."
        )
    source = FolderSource(Path(support_dir), channels=int(preprocess["channels"]), strict=True)
    classes = source.classes()
    if len(classes) < 2:
        raise FewShotError(
            f"Support folder {support_dir} has {len(classes)} class with images; few-shot prediction needs "
            "at least 2 classes (one sub-folder of example images per class)."
        )
    fixed = preprocess.get("head_ways")
    check_ways(
        method.name,
        fixed,
        len(classes),
        f"the {len(classes)} classes of support folder {support_dir}",
        f"give the support folder exactly {fixed} class folders, or use a checkpoint of a metric method "
        "(protonet, matching, relation), which takes any number of classes",
    )
    support = torch.stack([load_image(p, preprocess) for c in classes for p in c.items])
    labels = torch.tensor([i for i, c in enumerate(classes) for _ in c.items])
    files = query_files(queries)
    query = torch.stack([load_image(p, preprocess) for p in files])
    method.eval()
    with torch.no_grad():
        predictor = method.adapt(support, labels)
        probs = method.probabilities(predictor(query))
    names = [c.name for c in classes]
    out = []
    for path, row in zip(files, probs, strict=True):
        best = int(row.argmax())
        out.append(
            Prediction(
                str(path),
                names[best],
                float(row[best]),
                {n: float(p) for n, p in zip(names, row, strict=True)},
            )
        )
    return out
