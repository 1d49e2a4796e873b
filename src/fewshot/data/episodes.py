"""Episode containers: the one data type every method and the engine agree on.

An episode is one few-shot task: a support set of N classes with K labelled
examples each, and a query set of Q examples per class to predict. Labels are
always remapped to 0..N-1 so that no method ever sees a dataset's class ids.
An ``EpisodeBatch`` stacks T episodes of the same shape with a leading task
dimension, which is what lets gradient methods vmap over tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Episode:
    """One N-way K-shot Q-query task.

    Shapes: support (N*K, *x), support_labels (N*K,), query (N*Q, *x),
    query_labels (N*Q,). ``class_names`` gives the dataset class behind each
    remapped label, for display and debugging only.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    class_names: list[str] = field(default_factory=list)

    @property
    def ways(self) -> int:
        return int(self.support_labels.max().item()) + 1

    @property
    def shots(self) -> int:
        return self.support_labels.shape[0] // self.ways

    @property
    def queries(self) -> int:
        return self.query_labels.shape[0] // self.ways

    def to(self, device: torch.device | str) -> Episode:
        return replace(
            self,
            support=self.support.to(device),
            support_labels=self.support_labels.to(device),
            query=self.query.to(device),
            query_labels=self.query_labels.to(device),
        )


@dataclass
class EpisodeBatch:
    """T episodes of identical shape stacked along a leading task dimension.

    Shapes: support (T, N*K, *x), support_labels (T, N*K), query (T, N*Q, *x),
    query_labels (T, N*Q). ``class_names[t]`` lists the classes of episode t.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    class_names: list[list[str]] = field(default_factory=list)

    @property
    def tasks(self) -> int:
        return self.support.shape[0]

    @property
    def ways(self) -> int:
        return int(self.support_labels[0].max().item()) + 1

    @property
    def shots(self) -> int:
        return self.support_labels.shape[1] // self.ways

    @property
    def queries(self) -> int:
        return self.query_labels.shape[1] // self.ways

    def __len__(self) -> int:
        return self.tasks

    def __getitem__(self, t: int) -> Episode:
        return Episode(
            support=self.support[t],
            support_labels=self.support_labels[t],
            query=self.query[t],
            query_labels=self.query_labels[t],
            class_names=self.class_names[t] if self.class_names else [],
        )

    def __iter__(self):
        return (self[t] for t in range(self.tasks))

    @classmethod
    def stack(cls, episodes: list[Episode]) -> EpisodeBatch:
        """Stack same-shaped episodes into a batch (e.g. in a DataLoader collate)."""
        return cls(
            support=torch.stack([e.support for e in episodes]),
            support_labels=torch.stack([e.support_labels for e in episodes]),
            query=torch.stack([e.query for e in episodes]),
            query_labels=torch.stack([e.query_labels for e in episodes]),
            class_names=[e.class_names for e in episodes],
        )

    def split(self, sizes: list[int]) -> list[EpisodeBatch]:
        """Split along the task dimension (meta-batch sharding, chunked evaluation)."""
        out, start = [], 0
        for size in sizes:
            sl = slice(start, start + size)
            out.append(
                EpisodeBatch(
                    support=self.support[sl],
                    support_labels=self.support_labels[sl],
                    query=self.query[sl],
                    query_labels=self.query_labels[sl],
                    class_names=self.class_names[sl] if self.class_names else [],
                )
            )
            start += size
        return out

    def to(self, device: torch.device | str) -> EpisodeBatch:
        return replace(
            self,
            support=self.support.to(device),
            support_labels=self.support_labels.to(device),
            query=self.query.to(device),
            query_labels=self.query_labels.to(device),
        )
