"""Meta-testing: accuracy (or regression error) over fixed, seeded episodes with a 95% confidence interval.

The interval is 1.96 standard errors of the per-episode accuracies (the
convention of the few-shot literature, e.g. LibFewShot and the MAML and
Prototypical Networks papers), so two methods evaluated with the same seed
are compared on the very same tasks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from fewshot.data.datasets import FewShotDataset
from fewshot.data.sampler import EpisodeSampler
from fewshot.engine import distributed
from fewshot.methods.base import Method
from fewshot.tasks.sinusoid import SinusoidTasks


@dataclass
class EvalResult:
    """Accuracy (fraction) and its 95% CI half-width, and every setting that produced them."""

    accuracy: float
    ci95: float
    episodes: int
    ways: int
    shots: int
    queries: int
    split: str
    dataset: str
    seed: int
    method: str
    batchnorm: str
    details: dict[str, object] = field(default_factory=dict)
    metric: str = "accuracy"

    def line(self) -> str:
        """One readable line; a single episode has no interval ("± n/a", not "± nan")."""
        finite = math.isfinite(self.ci95)
        if self.metric == "mse":
            ci = f"{self.ci95:.4f}" if finite else "n/a"
            return (
                f"mse {self.accuracy:.4f} ± {ci} (95% CI, {self.episodes} tasks, "
                f"{self.shots}-shot, {self.queries} query points, sinusoid, {self.method}, seed {self.seed})"
            )
        ci = f"{100 * self.ci95:.2f}%" if finite else "n/a"
        return (
            f"accuracy {100 * self.accuracy:.2f}% ± {ci} "
            f"(95% CI, {self.episodes} episodes, "
            f"{self.ways}-way {self.shots}-shot, {self.queries} queries per class, {self.dataset} "
            f"{self.split}, {self.method}, batchnorm {self.batchnorm}, seed {self.seed})"
        )

    def to_dict(self) -> dict[str, object]:
        """Plain values for JSON; NaN and infinities (one episode's interval) become None, i.e. null."""
        return {key: _finite(value) for key, value in asdict(self).items()}


def _finite(value: object) -> object:
    """``value`` with every non-finite float replaced by None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 1.96 standard errors (sample standard deviation, n-1)."""
    n = values.numel()
    mean = values.double().mean().item()
    if n < 2:
        return mean, float("nan")
    return mean, 1.96 * values.double().std(unbiased=True).item() / math.sqrt(n)


def episode_accuracies(method: Method, sampler: EpisodeSampler, episodes: int, chunk: int) -> torch.Tensor:
    """Per-episode query accuracy over episodes 0..episodes-1 of ``sampler`` (tasks=1 sampler)."""
    was_training = method.training
    method.eval()
    mine = distributed.shard(episodes)  # under torchrun each rank takes a share; all get all results
    out = [torch.zeros(0, dtype=torch.float64)]
    try:
        for first in range(mine.start, mine.stop, chunk):
            batch = sampler.episodes(first, min(chunk, mine.stop - first))
            with torch.no_grad():
                logits = method.query_logits(batch)
            out.append((logits.argmax(-1) == batch.query_labels).double().mean(-1))
    finally:
        method.train(was_training)
    return distributed.gather_cat(torch.cat(out))


def regression_errors(method: Method, tasks: SinusoidTasks, count: int) -> torch.Tensor:
    """Mean squared query error of each of the first ``count`` tasks of ``tasks`` after adaptation.

    Exactly ``count`` tasks, drawn batch by batch, so the first n tasks are the same whatever ``count``.
    """
    was_training = method.training
    method.eval()
    errors = [torch.zeros(0)]
    try:
        for i in range(math.ceil(count / tasks.tasks)):
            batch = tasks[i]
            with torch.no_grad():
                pred = method.query_logits(batch)
            errors.append(((pred - batch.query_labels) ** 2).mean(dim=(1, 2)))
    finally:
        method.train(was_training)
    return torch.cat(errors)[:count]


def evaluate(
    method: Method,
    dataset: FewShotDataset,
    ways: int,
    shots: int,
    queries: int,
    episodes: int = 600,
    seed: int = 2017,
    chunk: int = 16,
) -> EvalResult:
    """Accuracy of ``method`` on ``episodes`` fixed episodes of ``dataset``."""
    sampler = EpisodeSampler(dataset, ways, shots, queries, tasks=1, seed=seed)
    accs = episode_accuracies(method, sampler, episodes, chunk)
    acc, ci = mean_ci95(accs)
    info = method.describe()
    return EvalResult(
        accuracy=acc,
        ci95=ci,
        episodes=episodes,
        ways=ways,
        shots=shots,
        queries=queries,
        split=dataset.split,
        dataset=dataset.name,
        seed=seed,
        method=str(info.get("method", method.name)),
        batchnorm=str(info.get("batchnorm", "n/a")),
        details=info,
    )
