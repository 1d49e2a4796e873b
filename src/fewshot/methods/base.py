"""The one interface every meta-learning method implements.

A method is a mapping-maker: ``adapt`` turns a support set into a predictor
(a callable from inputs to logits), and ``loss`` is the meta-training
objective over a batch of episodes. The engine, evaluation, prediction and
the CLI only ever use this interface, so they never ask which family
(gradient-based or metric-based) a method belongs to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from fewshot.data.episodes import EpisodeBatch

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch of inputs (M, *x) to logits (M, N) (or predictions for regression)."""


class Method(nn.Module, ABC):
    """Base class: a meta-learner whose parameters the outer loop optimises.

    Subclasses set ``name`` and implement ``adapt`` and ``loss``. ``loss``
    returns a scalar whose gradient with respect to ``self.parameters()`` is
    the meta-gradient, so any torch optimiser performs the outer update
    (Reptile included: its loss is a surrogate whose gradient is its update).
    """

    name: str = "method"

    @abstractmethod
    def adapt(self, support: torch.Tensor, support_labels: torch.Tensor) -> Predictor:
        """Turn one task's support set into a predictor for that task's queries."""

    @abstractmethod
    def loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Meta-training loss over a batch of episodes, and metrics (e.g. accuracy)."""

    def query_logits(self, batch: EpisodeBatch) -> torch.Tensor:
        """Logits (T, N*Q, N) of every query of every episode, for evaluation.

        The default adapts task by task; methods override it with a batched path.
        """
        out = []
        for episode in batch:
            predictor = self.adapt(episode.support, episode.support_labels)
            out.append(predictor(episode.query))
        return torch.stack(out)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities from this method's predictor outputs (softmax by default)."""
        return torch.softmax(logits, dim=-1)

    def describe(self) -> dict[str, object]:
        """Settings that results must record (method name, BatchNorm mode, ...)."""
        return {"method": self.name}
