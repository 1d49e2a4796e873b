"""Synthetic few-shot task distributions for fast, learnable unit tests.

Each class is a fixed random template image; examples are the template plus
noise and a small random shift. Training and held-out class pools are
disjoint, so "beats chance on held-out tasks" means the method generalises.
"""

from __future__ import annotations

import torch

from fewshot.data.episodes import EpisodeBatch


def class_templates(num_classes: int, image_shape=(1, 28, 28), seed: int = 0) -> torch.Tensor:
    """Smooth random templates (num_classes, C, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = image_shape
    coarse = torch.rand(num_classes, c, max(h // 4, 1), max(w // 4, 1), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def synthetic_batch(
    templates: torch.Tensor,
    tasks: int,
    ways: int,
    shots: int,
    queries: int,
    seed: int,
    noise: float = 0.3,
) -> EpisodeBatch:
    """A batch of episodes drawn from ``templates`` (a class pool)."""
    g = torch.Generator().manual_seed(seed)
    num_classes = templates.shape[0]
    per_class = shots + queries
    classes = torch.stack([torch.randperm(num_classes, generator=g)[:ways] for _ in range(tasks)])
    base = templates[classes]  # (T, N, C, H, W)
    x = base.unsqueeze(2).expand(-1, -1, per_class, -1, -1, -1)
    x = x + noise * torch.randn(x.shape, generator=g)
    labels = torch.arange(ways).repeat_interleave(shots)
    qlabels = torch.arange(ways).repeat_interleave(queries)
    support = x[:, :, :shots].reshape(tasks, ways * shots, *templates.shape[1:])
    query = x[:, :, shots:].reshape(tasks, ways * queries, *templates.shape[1:])
    return EpisodeBatch(
        support=support.float(),
        support_labels=labels.expand(tasks, -1).clone(),
        query=query.float(),
        query_labels=qlabels.expand(tasks, -1).clone(),
        class_names=[[str(int(c)) for c in row] for row in classes],
    )
