"""Prototypical Networks, and the episode plumbing every metric method shares.

Metric methods adapt by embedding the support set once and classify queries
by comparing embeddings. The helpers here (one-call embedding
of a whole batch, per-class aggregation with one-hot products, metrics) are
shared with ``matching`` and ``relation``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.data.episodes import EpisodeBatch
from fewshot.methods.base import Method
from fewshot.methods.episode_checks import check_batch, check_query, check_task
from fewshot.models.norm import one_running_update, outputs_independent

Distance = Literal["euclidean", "cosine"]


# --------------------------------------------------------------------------
# Shared helpers for metric methods
# --------------------------------------------------------------------------


EVAL_BLOCK_ELEMENTS = 1 << 18
"""Input elements per backbone call when examples are independent (334
Omniglot images, 12 of mini-ImageNet): a test chunk of 16 tasks of 20 ways
is 5,120 to 6,400 Omniglot images, whose first-layer activations (1 to 1.3
GB) would stream through memory in every layer; in blocks, Relation Networks'
20-way test episodes run 1.4 to 2.1 times faster (benchmarks/relation_speed.py,
two runs)."""


def embed(backbone: nn.Module, examples: torch.Tensor) -> torch.Tensor:
    """The backbone on a stack of examples (B, *example_shape).

    In eval mode, when every BatchNorm uses running statistics, each
    example's output is its own, so the examples go through in blocks of
    ``EVAL_BLOCK_ELEMENTS``; in training, or when the batch normalises
    itself, in one call.
    """
    if len(examples) == 0 or not outputs_independent(backbone):
        return backbone(examples)
    blocks = examples.split(max(1, EVAL_BLOCK_ELEMENTS // examples[0].numel()))
    return torch.cat([backbone(block) for block in blocks])


def embed_batch(backbone: nn.Module, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed the support and query examples of every task.

    Returns support embeddings (T, S, *f) and query embeddings (T, M, *f),
    where ``f`` is whatever the backbone outputs per example (a vector or a
    feature map). Whenever the backbone normalises by its batch (training, or
    batch statistics at test time) each episode is its own backbone call, so
    an episode's statistics, and so its outputs, never depend on the other
    episodes; in training the running statistics take one update per
    meta-batch: a meta-batch split across processes then gives the same
    meta-gradient and the same model as one process. When each example's
    output is its own (``outputs_independent``) all tasks share one ``embed``.
    """
    t, s = batch.support.shape[:2]
    m = batch.query.shape[1]
    if t > 1 and not outputs_independent(backbone):
        parts = []
        with one_running_update(backbone) as task_done:
            for episode in batch.split([1] * t):
                parts.append(embed_batch(backbone, episode))
                task_done()
        return torch.cat([p for p, _ in parts]), torch.cat([q for _, q in parts])
    z = embed(backbone, torch.cat([batch.support.flatten(0, 1), batch.query.flatten(0, 1)]))
    return z[: t * s].unflatten(0, (t, s)), z[t * s :].unflatten(0, (t, m))


def class_aggregate(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ways: int,
    reduce: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Per-class mean (or sum) of embeddings (..., S, *f) -> (..., N, *f).

    A one-hot matrix product, so support order is irrelevant and a whole
    batch of tasks is one batched matmul.
    """
    lead = labels.dim()
    feat_shape = embeddings.shape[lead:]
    one_hot = F.one_hot(labels.long(), ways).to(embeddings.dtype)  # (..., S, N)
    weights = one_hot.transpose(-1, -2)  # (..., N, S)
    if reduce == "mean":
        weights = weights / weights.sum(-1, keepdim=True)
    elif reduce != "sum":
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    return (weights @ embeddings.flatten(lead)).unflatten(-1, feat_shape)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over logits (..., N) and labels (...), with accuracy."""
    loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten().long())
    return loss, {"loss": loss.item(), "accuracy": accuracy(logits, labels)}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of queries whose highest logit is the true class."""
    return (logits.argmax(-1) == labels).float().mean().item()


def batchnorm_mode(module: nn.Module) -> str:
    """How the module's BatchNorm layers normalise, for ``describe()``."""
    flags = [
        m.track_running_stats for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if not flags:
        return "none"
    if all(flags):
        return "running-stats"
    return "batch-stats" if not any(flags) else "mixed"


# --------------------------------------------------------------------------
# Prototypical Networks
# --------------------------------------------------------------------------


class PrototypePredictor:
    """Classifies queries by their distance to one task's class prototypes."""

    def __init__(
        self, method: PrototypicalNetwork, prototypes: torch.Tensor, example_shape: tuple[int, ...]
    ) -> None:
        self.method = method
        self.prototypes = prototypes  # (N, F)
        self.example_shape = example_shape

    @property
    def ways(self) -> int:
        return self.prototypes.shape[0]

    def __call__(self, query: torch.Tensor) -> torch.Tensor:
        check_query(query, self.example_shape)
        return self.method.logits(embed(self.method.backbone, query), self.prototypes)


class PrototypicalNetwork(Method):
    """Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

    Each class is represented by the mean embedding of its support examples
    (its prototype); a query's logit for a class is the negative squared
    Euclidean distance to that prototype, scaled by ``scale``. With
    ``distance="cosine"`` the logit is ``scale * cos(query, prototype)``
    instead; cosine logits live in [-1, 1], so a scale (10 by default, as in
    Chen et al. 2019 / TADAM) is needed for a confident softmax, and
    ``learn_scale=True`` makes it a meta-learned temperature.

    Args:
        backbone: embedding network mapping (B, C, H, W) to (B, F), e.g. Conv4().
        features: F, recorded by ``describe()`` (optional; not needed to compute).
        distance: "euclidean" (the paper) or "cosine".
        scale: logit multiplier; default 1 for euclidean, 10 for cosine.
        learn_scale: meta-learn the scale (stored as a log so it stays positive).

    BatchNorm in the backbone uses running statistics: batch statistics while
    meta-training (``train()``), running averages at test time (``eval()``).
    """

    name = "protonet"

    def __init__(
        self,
        backbone: nn.Module,
        features: int | None = None,
        distance: Distance = "euclidean",
        scale: float | None = None,
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
        if scale is None:
            scale = 1.0 if distance == "euclidean" else 10.0
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.backbone = backbone
        self.features = features
        self.distance: Distance = distance
        self.learn_scale = learn_scale
        log_scale = torch.tensor(math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def logits(self, queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Logits (..., M, N) of query embeddings (..., M, F) against prototypes (..., N, F)."""
        if self.distance == "cosine":
            sim = F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-1, -2)
            return self.scale * sim
        # ||q - p||^2 = ||q||^2 - 2 q.p + ||p||^2, as one matmul; clamp rounding below zero.
        sq = (
            queries.pow(2).sum(-1, keepdim=True)
            - 2 * queries @ prototypes.transpose(-1, -2)
            + prototypes.pow(2).sum(-1).unsqueeze(-2)
        ).clamp_min(0)
        return -self.scale * sq

    def prototypes(self, embeddings: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
        """Class means (..., N, F) of support embeddings (..., S, F)."""
        return class_aggregate(embeddings, labels, ways, "mean")

    def adapt(self, support: torch.Tensor, support_labels: torch.Tensor) -> PrototypePredictor:
        """Embed the support set once and keep its prototypes."""
        ways = check_task(support, support_labels)
        protos = self.prototypes(embed(self.backbone, support), support_labels, ways)
        return PrototypePredictor(self, protos, tuple(support.shape[1:]))

    def query_logits(self, batch: EpisodeBatch) -> torch.Tensor:
        """Logits (T, M, N) for every task, from a single backbone call."""
        ways = check_batch(batch)
        support, query = embed_batch(self.backbone, batch)
        return self.logits(query, self.prototypes(support, batch.support_labels, ways))

    def loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of the queries under the softmax over negative distances."""
        check_batch(batch, with_query_labels=True)
        return classification_metrics(self.query_logits(batch), batch.query_labels)

    def describe(self) -> dict[str, object]:
        return {
            "method": self.name,
            "distance": self.distance,
            "scale": float(self.scale.detach()),
            "learn_scale": self.learn_scale,
            "backbone": type(self.backbone).__name__,
            "features": self.features,
            "batchnorm": batchnorm_mode(self.backbone),
        }
