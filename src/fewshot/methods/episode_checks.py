"""Input checks every method shares: an episode's shapes and its labels 0..N-1.

A bad episode (labels that skip a class, queries of another shape) must be a
clear error at the method's door, not an index error deep in a loss or a
silently undefined prototype; metric and gradient-based methods alike call these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewshot.data.episodes import EpisodeBatch
from fewshot.errors import EpisodeError


def count_ways(labels: torch.Tensor) -> int:
    """Number of classes N, after checking every task's labels are exactly 0..N-1.

    ``labels`` is (S,) for one task or (T, S) for a batch; every task must
    contain every class at least once, otherwise its prototype (or class
    feature) would be undefined.
    """
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.numel() == 0:
        raise EpisodeError("the support set is empty; each episode needs at least one shot")
    if int(labels.min()) < 0:
        raise EpisodeError(
            f"support labels must be 0..N-1, found {int(labels.min())}; remap class ids "
            "to 0..N-1 per episode (the episode sampler does this)"
        )
    ways = int(labels.max()) + 1
    present = F.one_hot(labels.long(), ways).sum(-2) > 0  # (..., N)
    if not bool(present.all()):
        missing = sorted({int(c) for c in (~present).nonzero()[:, -1]})
        raise EpisodeError(
            f"support labels must cover every class 0..{ways - 1}, but class(es) {missing} "
            "have no support example in at least one task; remap labels to 0..N-1 with "
            "every class present (the episode sampler does this)"
        )
    return ways


def check_task(support: torch.Tensor, support_labels: torch.Tensor) -> int:
    """Validate one task's support set (S, *x) and labels (S,); return N."""
    if support_labels.dim() != 1:
        raise ValueError(
            f"support_labels must have shape (S,) for one task, got {tuple(support_labels.shape)}; "
            "for a batch of tasks use loss() or query_logits() with an EpisodeBatch"
        )
    if support.dim() < 2 or support.shape[0] != support_labels.shape[0]:
        raise ValueError(
            f"support has shape {tuple(support.shape)} but support_labels has "
            f"{support_labels.shape[0]} labels; expected support (S, C, H, W) with S labels"
        )
    return count_ways(support_labels)


def check_batch(batch: EpisodeBatch, with_query_labels: bool = False) -> int:
    """Validate an EpisodeBatch's shapes and labels; return N."""
    s, sl, q = batch.support, batch.support_labels, batch.query
    if sl.dim() != 2 or s.dim() < 3 or s.shape[:2] != sl.shape:
        raise ValueError(
            f"batch.support {tuple(s.shape)} and batch.support_labels {tuple(sl.shape)} must be "
            "(T, S, C, H, W) and (T, S)"
        )
    if q.dim() != s.dim() or q.shape[0] != s.shape[0] or q.shape[2:] != s.shape[2:]:
        raise ValueError(
            f"batch.query {tuple(q.shape)} must be (T, M, *x) with the same T and example "
            f"shape as batch.support {tuple(s.shape)}"
        )
    ways = count_ways(sl)
    if with_query_labels:
        ql = batch.query_labels
        if ql.shape != q.shape[:2]:
            raise ValueError(f"batch.query_labels {tuple(ql.shape)} must be (T, M) = {tuple(q.shape[:2])}")
        if ql.numel() and (int(ql.min()) < 0 or int(ql.max()) >= ways):
            raise EpisodeError(
                f"query labels must lie in 0..{ways - 1} (the support set's classes), "
                f"found {int(ql.min())}..{int(ql.max())}"
            )
    return ways


def check_query(query: torch.Tensor, example_shape: tuple[int, ...]) -> None:
    """Reject queries whose example shape differs from the support set's."""
    if query.dim() != len(example_shape) + 1 or tuple(query.shape[1:]) != example_shape:
        raise ValueError(
            f"query must have shape (M, {', '.join(map(str, example_shape))}) like the support "
            f"set, got {tuple(query.shape)}"
        )
