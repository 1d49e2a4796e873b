"""Reptile: first-order meta-learning by moving towards task-adapted weights.

Nichol, Achiam & Schulman (2018), "On First-Order Meta-Learning Algorithms".
For each task, take ``inner_steps`` plain SGD steps from the initial
parameters theta on the task's training examples, reaching theta'_t. The
Reptile update moves theta towards the mean of the theta'_t:

    theta <- theta + epsilon * (mean_t theta'_t - theta).

``Reptile.loss`` returns a surrogate scalar whose gradient with respect to
theta is ``theta - mean_t theta'_t``, so an outer ``torch.optim.SGD`` with
``lr=epsilon`` performs exactly that update (the paper also uses Adam on this
direction). The scalar's *value* is the query loss after adaptation, so logs
stay meaningful.

The inner steps run vectorised over tasks with ``torch.func.vmap`` (or task by
task on the loop path) through the same ``inner_loop`` as MAML, without any
second-order graph.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from fewshot.data.episodes import EpisodeBatch
from fewshot.methods.inner_loop import (
    Engine,
    Params,
    TaskForward,
    batch_metrics,
    inner_loop,
    query_forward,
    vmap_tasks,
)
from fewshot.methods.maml import MAML


class Reptile(MAML):
    """Reptile (Nichol et al. 2018) with plain-SGD inner steps.

    Args:
        model: the network (its ``nn.BatchNorm*`` layers become ``TaskBatchNorm``).
        inner_lr: inner SGD step size (a float, or one per step).
        inner_steps: SGD steps per task during meta-training (the paper uses 5-10).
        inner_steps_test: steps when adapting for evaluation; defaults to ``inner_steps``.
        use_query: also train the inner loop on the query examples (support + query
            together), as Reptile treats a task's data as one training set. The
            reported metrics are then measured on examples the inner loop saw.
        batchnorm, task, path, forward, chunk_size: as for ``MAML``.

    The outer update is the optimiser's: ``torch.optim.SGD(method.parameters(),
    lr=epsilon)`` gives the paper's update, ``Adam`` its Adam variant.
    """

    name = "reptile"

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float | Sequence[float] = 0.1,
        inner_steps: int = 5,
        inner_steps_test: int | None = None,
        use_query: bool = False,
        batchnorm: str = "transductive",
        task: str = "classification",
        path: str = "auto",
        forward: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            model,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            inner_steps_test=inner_steps_test,
            first_order=True,
            per_step_lr=False,
            batchnorm=batchnorm,
            task=task,
            path=path,
            forward=forward,
            chunk_size=chunk_size,
        )
        self.use_query = bool(use_query)

    def _reptile_task(
        self,
        params: Params,
        xs: torch.Tensor,
        ys: torch.Tensor,
        xq: torch.Tensor,
        yq: torch.Tensor,
        *,
        engine: Engine,
        forward: TaskForward,
    ) -> tuple[Params, torch.Tensor, torch.Tensor]:
        """One task: (adapted parameters, query loss, query outputs), nothing differentiable."""
        x_train, y_train = (torch.cat([xs, xq]), torch.cat([ys, yq])) if self.use_query else (xs, ys)
        lr = functools.partial(self._lr, {})
        adapted = inner_loop(
            forward,
            self.loss_fn,
            params,
            self._adapt_names(),
            x_train,
            y_train,
            self.inner_steps,
            lr,
            create_graph=False,
            engine=engine,
        )
        adapted = {n: adapted[n] for n in self._adapt_names()}
        with torch.no_grad():
            full = {**params, **adapted}
            out = query_forward(forward, full, xs, xq, self._nt)
            return adapted, self.loss_fn(out, yq), out

    def loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Surrogate whose gradient is theta - mean(adapted theta); its value is the query loss."""
        named = dict(self.model.named_parameters())
        params = {k: v.detach() for k, v in named.items()}
        data = (batch.support, batch.support_labels, batch.query, batch.query_labels)

        def vectorised() -> tuple[Params, torch.Tensor, torch.Tensor]:
            fn = functools.partial(self._reptile_task, engine="func", forward=self._forward_vec)
            sums: Params = {}
            losses, outs = [], []
            parts = zip(*(d.split(self._chunks(batch)) for d in data), strict=True)
            for part in parts:
                adapted, loss_c, out_c = vmap_tasks(fn, (params,), part)
                for n, v in adapted.items():
                    sums[n] = sums[n] + v.sum(0) if n in sums else v.sum(0)
                losses.append(loss_c)
                outs.append(out_c)
            return sums, torch.cat(losses), torch.cat(outs)

        def loop() -> tuple[Params, torch.Tensor, torch.Tensor]:
            fn = functools.partial(self._reptile_task, engine="autograd", forward=self._forward_loop)
            sums: Params = {}
            losses, outs = [], []
            for t in range(batch.tasks):
                adapted, loss_t, out_t = fn(params, *(d[t] for d in data))
                for n, v in adapted.items():
                    sums[n] = sums[n] + v if n in sums else v.clone()
                losses.append(loss_t)
                outs.append(out_t)
            return sums, torch.stack(losses), torch.stack(outs)

        sums, losses, outs = self.runner.run("train", vectorised, loop)
        loss = losses.mean().detach()
        surrogate = torch.zeros((), dtype=loss.dtype, device=loss.device)
        for name, total in sums.items():
            direction = (params[name] - total / batch.tasks).detach()
            surrogate = surrogate + (named[name] * direction).sum()
        value = loss + (surrogate - surrogate.detach())
        return value, batch_metrics(self.task, loss, outs, batch.query_labels)

    def describe(self) -> dict[str, object]:
        out = super().describe()
        out["method"] = self.name  # first order by definition: no "(first order)" label
        out["use_query"] = self.use_query
        out["first_order"] = True
        return out
