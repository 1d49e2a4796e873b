"""Relation Networks: a learned comparison between query and class feature maps.

Adaptation embeds the support set once into per-class feature maps;
prediction concatenates each query's feature map with each class's and lets a
small network score the pair's relation in [0, 1].
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
from fewshot.methods.protonet import (
    accuracy,
    batchnorm_mode,
    class_aggregate,
    classification_metrics,
    embed,
    embed_batch,
)
from fewshot.models.backbones import conv_block
from fewshot.models.norm import one_running_update, outputs_independent

RelationLoss = Literal["mse", "ce"]
Aggregate = Literal["sum", "mean"]

PAIR_BLOCK_ELEMENTS = 1 << 24
"""Elements of the (class, query) pair activations per relation-module call at
test time (64 MB in float32). A test chunk of 16 tasks of 20 ways and 15
queries a class is 96,000 pairs of 64x7x7 maps: 1.2 GB in each relation
layer, above the 1 GiB block that malloc keeps (``fewshot.allocator``), so
each layer faulted in fresh pages. In blocks (here one task a call) the
chunk runs 2.1 to 2.5 times faster (benchmarks/relation_speed.py), and
``fewshot eval`` of a 20-way 1-shot run took 2 min 5 s instead of 5 min
19 s, in 0.8 GB instead of 5."""


def conv_block_no_pool(
    in_channels: int, out_channels: int, track_running_stats: bool = True
) -> nn.Sequential:
    """3x3 conv, BatchNorm, ReLU without pooling: keeps the feature map's size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        nn.ReLU(),
    )


def relation_embedding(in_channels: int = 1, hidden: int = 64) -> nn.Sequential:
    """The paper's embedding module: Conv-4 whose last two blocks do not pool.

    Its output is a feature map (B, hidden, H/4, W/4), not a vector, so the
    relation module can compare spatial features.
    """
    return nn.Sequential(
        conv_block(in_channels, hidden),
        conv_block(hidden, hidden),
        conv_block_no_pool(hidden, hidden),
        conv_block_no_pool(hidden, hidden),
    )


class RelationModule(nn.Module):
    """Scores a concatenated (class, query) feature-map pair: 2 conv blocks + 2 FC layers.

    Returns the pre-sigmoid relation (B,); the sigmoid of it is the paper's
    relation score in [0, 1].
    """

    def __init__(
        self, in_channels: int, map_size: tuple[int, int], hidden: int = 64, fc_hidden: int = 8
    ) -> None:
        super().__init__()
        h, w = map_size[0] // 4, map_size[1] // 4
        if h == 0 or w == 0:
            raise ValueError(
                f"the embedding's {map_size[0]}x{map_size[1]} feature maps are too small for the "
                "relation module's two 2x2 max-pools (need at least 4x4); use larger images "
                "or an embedding that pools less"
            )
        self.convs = nn.Sequential(conv_block(in_channels, hidden), conv_block(hidden, hidden))
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(hidden * h * w, fc_hidden), nn.ReLU(), nn.Linear(fc_hidden, 1)
        )

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """Relations (B,) of concatenated (class, query) pairs (B, 2C, h, w)."""
        return self.fc(self.convs(pairs)).squeeze(-1)

    def compare(self, class_maps: torch.Tensor, query_maps: torch.Tensor) -> torch.Tensor:
        """Relations (..., M, N) of every query to every class of the same task.

        Shapes: class_maps (..., N, C, h, w), query_maps (..., M, C, h, w).
        The same numbers as ``forward`` on the concatenated (class, query)
        pairs, for a fraction of the work: a convolution is linear in its
        input and zero padding pads both halves alike, so the first
        convolution of a pair is the class half's convolution plus the query
        half's. Those are taken once per map and added with broadcasting,
        where the concatenated pairs convolve each map N or M times over (at
        20 ways and 5 queries a class, that convolution was about three
        quarters of a training episode's arithmetic).
        """
        *lead, m, c, h, w = query_maps.shape
        n = class_maps.shape[-4]
        first = self.convs[0][0]  # conv_block's zero-padded, ungrouped Conv2d
        conv = (first.stride, first.padding, first.dilation)
        by_class = F.conv2d(class_maps.reshape(-1, c, h, w), first.weight[:, :c], first.bias, *conv)
        by_query = F.conv2d(query_maps.reshape(-1, c, h, w), first.weight[:, c:], None, *conv)
        tasks = math.prod(lead)  # explicit, not -1: a task without queries is (..., 0, N)
        by_class = by_class.view(tasks, 1, n, *by_class.shape[1:])
        by_query = by_query.view(tasks, m, 1, *by_query.shape[1:])
        pairs = (by_query + by_class).flatten(0, 2)
        return self.fc(self.convs[1](self.convs[0][1:](pairs))).view(*lead, m, n)

    def compare_concatenated(self, class_maps: torch.Tensor, query_maps: torch.Tensor) -> torch.Tensor:
        """``compare`` as the paper writes it: every (class, query) pair concatenated and convolved.

        The reference that ``compare`` replaces, kept for benchmarks/relation_speed.py.
        """
        *lead, m, c, h, w = query_maps.shape
        n = class_maps.shape[-4]
        q = query_maps.unsqueeze(-4).expand(*lead, m, n, c, h, w)
        p = class_maps.unsqueeze(-5).expand(*lead, m, n, c, h, w)
        return self(torch.cat([p, q], dim=-3).reshape(-1, 2 * c, h, w)).view(*lead, m, n)


class RelationPredictor:
    """Scores queries against one task's class feature maps."""

    def __init__(
        self, method: RelationNetwork, class_maps: torch.Tensor, example_shape: tuple[int, ...]
    ) -> None:
        self.method = method
        self.class_maps = class_maps  # (N, C, h, w)
        self.example_shape = example_shape

    @property
    def ways(self) -> int:
        return self.class_maps.shape[0]

    def __call__(self, query: torch.Tensor) -> torch.Tensor:
        check_query(query, self.example_shape)
        return self.method.output(self.method.relations(embed(self.method.embedding, query), self.class_maps))


class RelationNetwork(Method):
    """Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018,
    arXiv:1711.06025).

    An embedding module maps images to feature maps; a class's feature map is
    the sum (the paper, ``aggregate="sum"``) or mean of its support feature
    maps. Each (class, query) pair is concatenated along channels and scored
    by a relation module (2 conv blocks, 2 FC layers, sigmoid) in [0, 1].

    With ``loss="mse"`` (the paper) the relation scores are regressed onto
    the one-hot labels, and the logits returned by predictors and
    ``query_logits`` are the scores themselves. With ``loss="ce"`` the
    logits are the pre-sigmoid relations and the loss is cross-entropy; the
    predicted class is the same either way, as the sigmoid is monotone.

    Args:
        image_shape: (C, H, W) of the inputs; sizes the relation module.
        hidden: filters of the default embedding and of the relation convs (64 in the paper).
        relation_hidden: width of the relation module's hidden FC layer (8 in the paper).
        embedding: an alternative embedding module mapping (B, C, H, W) to
            feature maps (B, C', h, w); default: ``relation_embedding(C, hidden)``.
        aggregate: how K support feature maps form a class feature map.
        loss: "mse" (the paper) or "ce".

    BatchNorm uses running statistics: batch statistics while meta-training
    (``train()``), running averages at test time (``eval()``).
    """

    name = "relation"

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        hidden: int = 64,
        relation_hidden: int = 8,
        embedding: nn.Module | None = None,
        aggregate: Aggregate = "sum",
        loss: RelationLoss = "mse",
    ) -> None:
        super().__init__()
        if aggregate not in ("sum", "mean"):
            raise ValueError(f"aggregate must be 'sum' or 'mean', got {aggregate!r}")
        if loss not in ("mse", "ce"):
            raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        self.image_shape = tuple(image_shape)
        self.embedding = embedding if embedding is not None else relation_embedding(image_shape[0], hidden)
        self.feature_shape = self._probe_feature_shape()
        c, h, w = self.feature_shape
        self.relation = RelationModule(2 * c, (h, w), hidden, relation_hidden)
        self.hidden = hidden
        self.relation_hidden = relation_hidden
        self.aggregate: Aggregate = aggregate
        self.loss_kind: RelationLoss = loss

    @torch.no_grad()
    def _probe_feature_shape(self) -> tuple[int, int, int]:
        """Feature-map shape of the embedding, found by one forward pass in eval mode."""
        was_training = self.embedding.training
        self.embedding.eval()
        try:
            out = self.embedding(torch.zeros(1, *self.image_shape))
        finally:
            self.embedding.train(was_training)
        if out.dim() != 4:
            raise ValueError(
                "the relation embedding must output feature maps (B, C, h, w), got shape "
                f"{tuple(out.shape)}; do not flatten (Conv4 flattens: use relation_embedding)"
            )
        return (out.shape[1], out.shape[2], out.shape[3])

    def relations(self, query_maps: torch.Tensor, class_maps: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid relations (..., M, N) of query maps to class maps.

        Shapes: query_maps (..., M, C, h, w), class_maps (..., N, C, h, w).
        At test time, when the relation module's BatchNorm uses running
        statistics, each pair's relation is its own, so the pairs are scored
        in blocks of ``PAIR_BLOCK_ELEMENTS`` (whole tasks, or one task's queries
        when a task is larger); in training in one call.
        """
        empty = query_maps.numel() == 0 or class_maps.numel() == 0
        if empty or not outputs_independent(self.relation):
            return self.relation.compare(class_maps, query_maps)
        *lead, m, c, h, w = query_maps.shape
        n = class_maps.shape[-4]
        pair = self.relation.convs[0][0].out_channels * h * w  # elements of one pair's first layer
        classes, queries = class_maps.reshape(-1, n, c, h, w), query_maps.reshape(-1, m, c, h, w)
        if m * n * pair <= PAIR_BLOCK_ELEMENTS:  # whole tasks a call
            per_call = PAIR_BLOCK_ELEMENTS // (m * n * pair)
            blocks = zip(classes.split(per_call), queries.split(per_call), strict=True)
        else:  # one task's queries in blocks
            per_call = max(1, PAIR_BLOCK_ELEMENTS // (n * pair))
            blocks = (
                (maps, q) for maps, task in zip(classes, queries, strict=True) for q in task.split(per_call)
            )
        parts = [self.relation.compare(maps, q).reshape(-1, n) for maps, q in blocks]
        return torch.cat(parts).view(*lead, m, n)

    def output(self, relations: torch.Tensor) -> torch.Tensor:
        """The logits this method reports: scores in [0, 1] for mse, raw relations for ce."""
        return torch.sigmoid(relations) if self.loss_kind == "mse" else relations

    def class_maps(self, support_maps: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
        """Class feature maps (..., N, C, h, w) from support maps (..., S, C, h, w)."""
        return class_aggregate(support_maps, labels, ways, self.aggregate)

    def _check_image_shape(self, example_shape: tuple[int, ...]) -> None:
        if tuple(example_shape) != self.image_shape:
            raise ValueError(
                f"this RelationNetwork was built for images of shape {self.image_shape}, got "
                f"{tuple(example_shape)}; construct it with image_shape={tuple(example_shape)}"
            )

    def adapt(self, support: torch.Tensor, support_labels: torch.Tensor) -> RelationPredictor:
        """Embed the support set once into one feature map per class."""
        ways = check_task(support, support_labels)
        self._check_image_shape(tuple(support.shape[1:]))
        maps = self.class_maps(embed(self.embedding, support), support_labels, ways)
        return RelationPredictor(self, maps, tuple(support.shape[1:]))

    def _batch_relations(self, batch: EpisodeBatch) -> torch.Tensor:
        ways = check_batch(batch)
        self._check_image_shape(tuple(batch.support.shape[2:]))
        # BatchNorm statistics of one task at a time, in training and on batch statistics at test time
        independent = outputs_independent(self.embedding) and outputs_independent(self.relation)
        if batch.tasks > 1 and not independent:
            parts = []
            with one_running_update(self) as task_done:
                for episode in batch.split([1] * batch.tasks):
                    parts.append(self._batch_relations(episode))
                    task_done()
            return torch.cat(parts)
        support, query = embed_batch(self.embedding, batch)
        return self.relations(query, self.class_maps(support, batch.support_labels, ways))

    def query_logits(self, batch: EpisodeBatch) -> torch.Tensor:
        """Logits (T, M, N) for every task (one embedding call in eval mode on running statistics)."""
        return self.output(self._batch_relations(batch))

    def loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE of relation scores against one-hot labels (the paper), or cross-entropy."""
        ways = check_batch(batch, with_query_labels=True)
        relations = self._batch_relations(batch)
        if self.loss_kind == "ce":
            return classification_metrics(relations, batch.query_labels)
        target = F.one_hot(batch.query_labels.long(), ways).to(relations.dtype)
        loss = F.mse_loss(torch.sigmoid(relations), target)
        return loss, {"loss": loss.item(), "accuracy": accuracy(relations, batch.query_labels)}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """MSE-trained relation scores are in [0, 1] already: normalise them to sum to one."""
        if self.loss_kind == "mse":
            return logits / logits.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return torch.softmax(logits, dim=-1)

    def describe(self) -> dict[str, object]:
        return {
            "method": self.name,
            "distance": "learned-relation",
            "aggregate": self.aggregate,
            "loss": self.loss_kind,
            "embedding": type(self.embedding).__name__,
            "feature_shape": list(self.feature_shape),
            "hidden": self.hidden,
            "relation_hidden": self.relation_hidden,
            "batchnorm": batchnorm_mode(self),
        }
