"""Episode sampling: N-way K-shot Q-query tasks, reproducible from a seed.

Episode ``j`` of a sampler depends only on ``(seed, j)``: the same seed gives
the same episodes in any process, with any number of DataLoader workers and any
chunking into batches. That is what makes a fixed evaluation set (two methods
compared on the very same tasks) and exact resumption (restart at batch k) free.
The sampler is a map-style ``torch.utils.data.Dataset`` whose item ``i`` is the
``EpisodeBatch`` of episodes ``i*T .. i*T+T-1``; use it directly, or in a
``DataLoader(sampler, batch_size=None, num_workers=...)``.
"""

from __future__ import annotations

import numpy as np
import torch

from fewshot.data.datasets import FewShotDataset
from fewshot.data.episodes import Episode, EpisodeBatch
from fewshot.data.transforms import rotate, to_float
from fewshot.errors import EpisodeError


def check_episode_shape(dataset: FewShotDataset, ways: int, shots: int, queries: int) -> None:
    """Raise EpisodeError with the numbers if ``dataset`` cannot serve such episodes."""
    for what, value in (("ways", ways), ("shots", shots), ("queries", queries)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise EpisodeError(f"{what} must be a whole number of at least 1, got {value!r}.")
    if ways > dataset.num_classes:
        raise EpisodeError(
            f"{ways}-way episodes need {ways} classes, but {dataset.name} split "
            f"{dataset.split!r} has only {dataset.num_classes}. Lower ways to at most "
            f"{dataset.num_classes}."
        )
    counts = dataset.counts
    short = np.flatnonzero(counts < shots + queries)
    if short.size:
        c = int(short[0])
        raise EpisodeError(
            f"Class {dataset.class_names[c]!r} of {dataset.name} split {dataset.split!r} has "
            f"{int(counts[c])} images, fewer than shots + queries = {shots} + {queries} = "
            f"{shots + queries}"
            + (f" ({short.size} classes are that small)" if short.size > 1 else "")
            + ". Lower shots or queries, or add images to that class."
        )


class EpisodeSampler(torch.utils.data.Dataset):
    """Batches of ``tasks`` episodes of ``ways``-way ``shots``-shot ``queries``-query tasks.

    ``batches`` is the length seen by ``len()`` (e.g. training steps, or
    evaluation episodes / tasks); indexing past it is allowed for training.
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        ways: int,
        shots: int,
        queries: int,
        tasks: int = 1,
        seed: int = 0,
        batches: int = 1_000_000,
    ) -> None:
        check_episode_shape(dataset, ways, shots, queries)
        if tasks < 1:
            raise EpisodeError(f"tasks per batch must be at least 1, got {tasks}.")
        if not isinstance(seed, int | np.integer) or seed < 0:  # numpy would fail only at the first episode
            raise EpisodeError(
                f"The episode seed must be a whole number of at least 0, got {seed!r}; set seed "
                "(training), eval.seed (evaluation) or --seed to 0 or more."
            )
        self.dataset = dataset
        self.ways, self.shots, self.queries, self.tasks = ways, shots, queries, tasks
        self.seed = seed
        self.batches = batches
        self._counts = dataset.counts
        flat = dataset.flat_images()
        if flat is None:  # too large to pre-rotate: rotate per episode
            self._images, self._starts = dataset.store.images, dataset.store.offsets[dataset.store_class]
            self._rotation: torch.Tensor | None = torch.from_numpy(dataset.rotation)
        else:
            self._images, self._starts = flat
            self._rotation = None

    def __len__(self) -> int:
        return self.batches

    def episode_indices(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Episode j: its classes (N,) and store image indices (N, K+Q), support first."""
        rng = np.random.default_rng([self.seed, j])
        classes = rng.choice(self.dataset.num_classes, self.ways, replace=False)
        counts = self._counts[classes]
        keys = rng.random((self.ways, int(counts.max())))
        keys[np.arange(keys.shape[1]) >= counts[:, None]] = 2.0  # never pick past a class's end
        picks = np.argsort(keys, axis=1)[:, : self.shots + self.queries]
        return classes, self._starts[classes, None] + picks

    def _images_at(self, classes: np.ndarray, index: np.ndarray) -> torch.Tensor:
        """Float images at store rows ``index`` (T, N, M) of ``classes`` (T, N): (T, N*M, C, H, W)."""
        images = self._images[torch.from_numpy(index.reshape(-1))]
        if self._rotation is not None:
            turns = self._rotation[torch.from_numpy(classes)].repeat_interleave(index.shape[2])
            images = rotate(images, turns.view(-1))
        x = to_float(images, self.dataset.mean, self.dataset.std)
        return x.view(index.shape[0], index.shape[1] * index.shape[2], *x.shape[1:])

    def episodes(self, first: int, count: int) -> EpisodeBatch:
        """Episodes first .. first+count-1 stacked into one batch."""
        n, k, q = self.ways, self.shots, self.queries
        chosen = [self.episode_indices(j) for j in range(first, first + count)]
        classes = np.stack([c for c, _ in chosen])  # (T, N)
        index = np.stack([i for _, i in chosen])  # (T, N, K+Q)
        labels = torch.arange(n)
        names = self.dataset.class_names
        return EpisodeBatch(
            support=self._images_at(classes, index[:, :, :k]),
            support_labels=labels.repeat_interleave(k).expand(count, -1).contiguous(),
            query=self._images_at(classes, index[:, :, k:]),
            query_labels=labels.repeat_interleave(q).expand(count, -1).contiguous(),
            class_names=[[names[c] for c in row] for row in classes],
        )

    def episode(self, j: int) -> Episode:
        return self.episodes(j, 1)[0]

    def __getitem__(self, i: int) -> EpisodeBatch:
        if i < 0:
            raise IndexError(i)
        return self.episodes(i * self.tasks, self.tasks)


def fixed_episodes(
    dataset: FewShotDataset,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int = 2017,
    chunk: int = 32,
) -> list[EpisodeBatch]:
    """A fixed, seeded evaluation set: the same tasks for every method that uses the seed."""
    sampler = EpisodeSampler(dataset, ways, shots, queries, tasks=1, seed=seed)
    return [sampler.episodes(s, min(chunk, episodes - s)) for s in range(0, episodes, chunk)]
