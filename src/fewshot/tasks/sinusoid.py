"""Sinusoid regression, the toy task family of the MAML paper (Finn et al. 2017, 5.1).

Each task is y = A sin(x - phi) with amplitude A ~ U[0.1, 5], phase
phi ~ U[0, pi] and inputs x ~ U[-5, 5]; the loss is the mean squared error.
Batches come as ``EpisodeBatch`` with float targets of shape (T, K, 1) in
place of class labels, so every gradient-based method trains on them unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fewshot.data.episodes import EpisodeBatch
from fewshot.errors import EpisodeError

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


class SinusoidTasks(torch.utils.data.Dataset):
    """Batches of ``tasks`` sinusoid tasks with ``shots`` support and ``queries`` query points.

    Like the image episode sampler, batch i depends only on ``(seed, i)``.
    """

    def __init__(
        self, shots: int = 10, queries: int = 10, tasks: int = 25, seed: int = 0, batches: int = 1_000_000
    ) -> None:
        for what, value in (("shots", shots), ("queries", queries), ("tasks", tasks)):
            if value < 1:
                raise EpisodeError(f"{what} must be at least 1, got {value}.")
        self.shots, self.queries, self.tasks, self.seed, self.batches = shots, queries, tasks, seed, batches

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, i: int) -> EpisodeBatch:
        rng = np.random.default_rng([self.seed, i])
        amplitude = rng.uniform(*AMPLITUDE, size=(self.tasks, 1, 1))
        phase = rng.uniform(*PHASE, size=(self.tasks, 1, 1))
        x = rng.uniform(*X_RANGE, size=(self.tasks, self.shots + self.queries, 1))
        y = amplitude * np.sin(x - phase)
        x_t = torch.from_numpy(x).float()
        y_t = torch.from_numpy(y).float()
        k = self.shots
        return EpisodeBatch(
            support=x_t[:, :k], support_labels=y_t[:, :k], query=x_t[:, k:], query_labels=y_t[:, k:]
        )
