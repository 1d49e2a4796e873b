"""From a configuration to the things a run needs: method, task samplers, validation.

This is the one place that knows how config names map to datasets, samplers
and methods; the training loop, evaluation and prediction get them from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fewshot.config import Config
from fewshot.data.datasets import FewShotDataset, load_dataset
from fewshot.data.episodes import EpisodeBatch
from fewshot.data.sampler import EpisodeSampler, check_episode_shape
from fewshot.engine import distributed
from fewshot.engine.evaluate import episode_accuracies, regression_errors
from fewshot.methods.base import Method
from fewshot.methods.registry import build_method
from fewshot.tasks.sinusoid import SinusoidTasks

VAL_SEED_OFFSET = 1
"""Validation episodes use eval.seed + 1, so they never coincide with the test episodes' seed."""


def load_split(config: Config, split: str, progress: bool = True) -> FewShotDataset:
    d = config.data
    with distributed.main_first():  # under torchrun, one process per machine builds the data cache
        return load_dataset(
            d.dataset,
            split,
            data_root=d.data_root,
            image_size=d.image_size,
            rotations=d.rotations,
            progress=progress and distributed.is_main(),
        )


class RankShare(torch.utils.data.Dataset):
    """This rank's slice of every meta-batch: tasks r*T/N .. (r+1)*T/N - 1 of batch k.

    An episode sampler draws only those episodes (episode j depends only on
    (seed, j)); sinusoid batches are drawn whole and sliced.
    """

    def __init__(self, sampler: torch.utils.data.Dataset, meta_batch: int) -> None:
        self.sampler, self.meta_batch = sampler, meta_batch
        self.per_rank = distributed.check_meta_batch(meta_batch)
        self.rank, self.world = distributed.rank(), distributed.world_size()

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __getitem__(self, k: int) -> EpisodeBatch:
        if isinstance(self.sampler, EpisodeSampler):
            return self.sampler.episodes(k * self.meta_batch + self.rank * self.per_rank, self.per_rank)
        return self.sampler[k].split([self.per_rank] * self.world)[self.rank]


@dataclass
class Experiment:
    """The method plus where its training batches and validation scores come from."""

    config: Config
    method: Method
    train_sampler: torch.utils.data.Dataset
    val_sampler: torch.utils.data.Dataset | None
    preprocess: dict[str, Any] = field(default_factory=dict)

    def batches(self, start: int) -> Iterator[EpisodeBatch]:
        """Training batches start, start+1, ...: batch k is the same whatever the start."""
        sampler = self.train_sampler
        if distributed.active():
            sampler = RankShare(sampler, self.config.train.meta_batch)
        workers = self.config.data.num_workers
        if workers == 0:
            step = start
            while True:
                yield sampler[step]
                step += 1
        indices = range(start, self.config.train.steps)
        subset = torch.utils.data.Subset(sampler, indices)
        yield from torch.utils.data.DataLoader(
            subset, batch_size=None, num_workers=workers, persistent_workers=False
        )

    def validate(self, method: Method) -> float:
        """Mean accuracy on the fixed validation episodes (negative MSE for regression)."""
        v = self.config.train
        if self.config.task == "sinusoid":
            assert isinstance(self.val_sampler, SinusoidTasks)
            return -float(regression_errors(method, self.val_sampler, v.val_episodes).mean())
        assert isinstance(self.val_sampler, EpisodeSampler)
        accs = episode_accuracies(method, self.val_sampler, v.val_episodes, self.config.eval.chunk)
        return float(accs.mean())


def build_experiment(config: Config, progress: bool = True) -> Experiment:
    """Datasets, samplers and the method for ``config`` (validation uses the eval task shape)."""
    if config.task == "sinusoid":
        e = config.train_episode
        train = SinusoidTasks(e.shots, e.queries, config.train.meta_batch, seed=config.seed)
        val = SinusoidTasks(e.shots, e.queries, 25, seed=config.eval.seed + VAL_SEED_OFFSET)
        method = build_method(config, input_shape=(1,))
        return Experiment(config, method, train, val, {"task": "sinusoid"})
    e = config.train_episode
    train_ds = load_split(config, config.data.train_split, progress)
    val_ds = load_split(config, config.data.val_split, progress)
    train = EpisodeSampler(
        train_ds, e.ways, e.shots, e.queries, tasks=config.train.meta_batch, seed=config.seed
    )
    check_episode_shape(val_ds, config.eval_ways, config.eval_shots, config.eval.queries)
    val = EpisodeSampler(
        val_ds,
        config.eval_ways,
        config.eval_shots,
        config.eval.queries,
        tasks=1,
        seed=config.eval.seed + VAL_SEED_OFFSET,
    )
    method = build_method(config, input_shape=train_ds.image_shape)
    return Experiment(config, method, train, val, train_ds.preprocess)
