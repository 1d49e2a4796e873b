"""Render an episode as a labelled grid of images, for a person to look at.

One row per class: its support images, then its query images, with the
remapped label and the dataset class name on the left.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from fewshot.data.episodes import Episode
from fewshot.errors import FewShotError


def _displayable(x: torch.Tensor, mean, std) -> np.ndarray:
    """Undo normalisation: (C, H, W) float to (H, W[, 3]) in [0, 1]."""
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    x = x.clamp(0, 1)
    return (x[0] if x.shape[0] == 1 else x.permute(1, 2, 0)).numpy()


def png_path(path: str | Path) -> Path:
    """The PNG file to write for ``path``: ``.png`` added when it has no suffix.

    The caller reports the returned path, so it must be the file actually written;
    a directory or another format would be silently renamed or fail inside matplotlib.
    """
    path = Path(path)
    if path.is_dir():
        raise FewShotError(f"{path} is a directory; give a PNG file name, e.g. {path / 'episode.png'}")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    elif path.suffix.lower() != ".png":
        raise FewShotError(f"{path}: episodes are written as PNG; give a file name ending in .png")
    return path


def render_episode(
    episode: Episode,
    path: str | Path,
    title: str = "",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Path:
    """Write ``episode`` to ``path`` (PNG) as a grid: rows are classes, support then query.

    Returns the file written (``path``, with ``.png`` added if it had no suffix).
    """
    path = png_path(path)
    n, k, q = episode.ways, episode.shots, episode.queries
    cols = k + q
    fig, axes = plt.subplots(n, cols, figsize=(1.1 * cols + 2.6, 1.1 * n + 0.6), squeeze=False)
    for label in range(n):
        sup = episode.support[episode.support_labels == label]
        qry = episode.query[episode.query_labels == label]
        for j, img in enumerate(list(sup) + list(qry)):
            ax = axes[label][j]
            ax.imshow(_displayable(img, mean, std), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            color = "tab:blue" if j < k else "tab:orange"
            for side in ax.spines.values():
                side.set_edgecolor(color)
                side.set_linewidth(2)
            if label == 0:
                ax.set_title("support" if j < k else "query", fontsize=8, color=color)
        name = episode.class_names[label] if episode.class_names else ""
        axes[label][0].set_ylabel(f"{label}: {name}", rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title or f"{n}-way {k}-shot {q}-query episode", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path
