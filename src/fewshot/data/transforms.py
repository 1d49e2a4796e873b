"""Pixel transforms shared by training, evaluation and prediction.

Images are stored as uint8; every consumer turns them into float tensors
through ``to_float`` with the dataset's mean and std, so a query image in
``fewshot predict`` is preprocessed exactly as in training.
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NO_NORMALISATION = None


def to_float(
    images: torch.Tensor,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """uint8 (..., C, H, W) to float32 in [0, 1], then per-channel (x - mean) / std if given."""
    x = images.to(torch.float32).div_(255.0)
    if mean is not None and std is not None:
        shape = (len(mean), 1, 1)
        m = torch.tensor(mean, dtype=torch.float32).view(shape)
        s = torch.tensor(std, dtype=torch.float32).view(shape)
        x = x.sub_(m).div_(s)
    return x


def rotate(images: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Rotate each image (N, C, H, W) counter-clockwise by its own multiple of 90 degrees."""
    out = images.clone()
    for k in (1, 2, 3):
        rows = (quarter_turns == k).nonzero().flatten()
        if rows.numel():
            out[rows] = torch.rot90(images[rows], k, dims=(-2, -1))
    return out
