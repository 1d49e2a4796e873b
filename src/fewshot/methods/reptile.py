"""Reptile: first-order meta-learning by moving towards task-adapted weights.

Nichol, Achiam & Schulman (2018), "On First-Order Meta-Learning Algorithms".
For each task, take ``inner_steps`` gradient steps from the initial
parameters theta on the task's training examples, reaching theta'_t. The
Reptile update moves theta towards the mean of the theta'_t:

    theta <- theta + epsilon * (mean_t theta'_t - theta).

``Reptile.loss`` returns a surrogate scalar whose gradient with respect to
theta is ``theta - mean_t theta'_t``, so an outer ``torch.optim.SGD`` with
``lr=epsilon`` performs exactly that update (the paper also uses Adam on this
direction). The scalar's *value* is the query loss after adaptation, so logs
stay meaningful.

The inner loop can follow the reference code (openai/supervised-reptile)
rather than plain full-batch SGD:

* ``inner_batch``: each step takes a minibatch of the task's examples, drawn
  as consecutive slices of a shuffled order that is reshuffled after each
  pass, so a task's 75 examples in batches of 25 over 3 steps are one pass.
  This is a third to a fifth of the full-batch work per step.
* ``inner_batch_test``: the same at evaluation (the reference code's
  ``--eval-batch``), where the order must not depend on when or how the
  episodes are evaluated: it comes from a generator seeded by the support
  set's own bytes, so a fixed test episode gets the same minibatches in any
  chunk, process or run, and evaluation never draws from the training
  generator.
* ``inner_optimizer="adam"``: the reference code's inner Adam with
  beta1 = 0 (so RMSProp with Adam's bias correction), whose second-moment
  estimate is *not* reset between tasks: it is a running average of squared
  inner gradients over the whole of training. Here it is a buffer of the
  method (checkpointed, resumed). The reference code runs a meta-batch's
  tasks one after another, each starting from the state the previous one
  left; vectorised, every task of a meta-batch starts from the same state,
  and afterwards the state takes in all their squared gradients (the
  average over tasks, with the decay of all their steps). Evaluation adapts
  from the state and leaves it unchanged, as the reference code does. Under
  torchrun each process folds in its own share of the tasks and the engine
  then averages the buffers across processes, which keeps them identical
  everywhere but decays the old state, and counts steps, over one share's
  steps rather than the whole meta-batch's.

The inner steps run vectorised over tasks with ``torch.func.vmap`` (or task by
task on the loop path), without any second-order graph.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fewshot.data.episodes import EpisodeBatch
from fewshot.methods.inner_loop import (
    Engine,
    Params,
    TaskForward,
    batch_metrics,
    query_forward,
    task_gradients,
    vmap_tasks,
)
from fewshot.methods.maml import MAML, _lr_key

INNER_OPTIMIZERS = ("sgd", "adam")
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8
"""The reference code's inner Adam: TensorFlow's defaults with beta1 = 0."""


class Reptile(MAML):
    """Reptile (Nichol et al. 2018).

    Args:
        model: the network (its ``nn.BatchNorm*`` layers become ``TaskBatchNorm``).
        inner_lr: inner step size (a float, or one per step); Adam's rate with
            ``inner_optimizer="adam"``.
        inner_steps: inner steps per task during meta-training.
        inner_steps_test: steps when adapting for evaluation; defaults to ``inner_steps``.
        use_query: also train the inner loop on the query examples (support + query
            together), as Reptile treats a task's data as one training set. The
            reported metrics are then measured on examples the inner loop saw.
        inner_batch: examples per inner step during meta-training (None: all of
            them).
        inner_batch_test: support examples per inner step when adapting for
            evaluation (None: the whole support set).
        inner_optimizer: "sgd", or "adam" (beta1 = 0, second moment kept across
            tasks, as in the reference code).
        batchnorm, adapt_batchnorm, task, path, forward, chunk_size: as for ``MAML``.

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
        inner_batch: int | None = None,
        inner_optimizer: str = "sgd",
        inner_batch_test: int | None = None,
        batchnorm: str = "transductive",
        adapt_batchnorm: bool = True,
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
            adapt_batchnorm=adapt_batchnorm,
            task=task,
            path=path,
            forward=forward,
            chunk_size=chunk_size,
        )
        for setting, value in (("inner_batch", inner_batch), ("inner_batch_test", inner_batch_test)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"{setting} must be a positive integer or None (all examples), got {value!r}"
                )
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
        self.use_query = bool(use_query)
        self.inner_batch = inner_batch
        self.inner_batch_test = inner_batch_test
        self.inner_optimizer = inner_optimizer
        self.moments = nn.Module()  # Adam's second moments, one buffer per adapted parameter
        if inner_optimizer == "adam":
            for name in self._adapt_names():
                param = self.model.get_parameter(name)
                self.moments.register_buffer(_lr_key(name), torch.zeros_like(param.detach()))
            self.register_buffer("inner_adam_steps", torch.zeros((), dtype=torch.long))

    # ---------------------------------------------------------------- inner loop

    def _moment(self, name: str) -> torch.Tensor:
        return self.moments.get_buffer(_lr_key(name))

    def _adapt(
        self,
        params: Params,
        x: torch.Tensor,
        y: torch.Tensor,
        order: torch.Tensor | None,
        *,
        steps: int,
        engine: Engine,
        forward: TaskForward,
        adam_steps: int,
    ) -> tuple[Params, Params]:
        """One task's inner loop: (adapted parameters, Adam's second moments after it, or {})."""
        names = self._adapt_names()
        current = dict(params)
        moments = {n: self._moment(n) for n in names} if self.inner_optimizer == "adam" else {}
        size = 0 if order is None else order.shape[-1] // max(steps, 1)
        for step in range(steps):
            xb, yb = x, y
            if order is not None:
                rows = order[step * size : (step + 1) * size]
                xb, yb = x.index_select(0, rows), y.index_select(0, rows)
            grads = task_gradients(forward, self.loss_fn, current, names, xb, yb, False, engine)
            for name in names:
                direction = grads[name]
                if moments:
                    moments[name] = ADAM_BETA2 * moments[name] + (1 - ADAM_BETA2) * direction * direction
                    correction = math.sqrt(1 - ADAM_BETA2 ** (adam_steps + step + 1))
                    direction = correction * direction / (moments[name].sqrt() + ADAM_EPS)
                current[name] = current[name] - self._lr({}, step, name) * direction
        return {n: current[n] for n in names}, moments

    def _adam_steps(self) -> int:
        return int(self.inner_adam_steps) if self.inner_optimizer == "adam" else 0

    def _minibatch_order(self, tasks: int, examples: int, device: torch.device) -> torch.Tensor | None:
        """Rows of each training inner step's minibatch, (tasks, steps * inner_batch); None for full batches.

        Drawn from torch's global generator, which the engine checkpoints, so a
        resumed run draws the same minibatches.
        """
        rows = _minibatch_rows(examples, self.inner_batch, self.inner_steps, [None] * tasks)
        return None if rows is None else rows.to(device)

    def _eval_order(self, support: torch.Tensor) -> torch.Tensor | None:
        """Rows of each evaluation inner step's minibatch for support sets (T, n, ...); None for full batches.

        Each task's order comes from a generator seeded by its support set's
        bytes: the same episode always adapts the same way, however it is
        batched, and the global generator (training's) is left untouched.
        """
        generators = (_seeded_by(task) for task in support.detach().cpu())  # lazy: unused for full batches
        rows = _minibatch_rows(support.shape[1], self.inner_batch_test, self.inner_steps_test, generators)
        return None if rows is None else rows.to(support.device)

    def _task(
        self,
        params: Params,
        lr_params: dict[str, torch.Tensor],
        xs: torch.Tensor,
        ys: torch.Tensor,
        xq: torch.Tensor,
        yq: torch.Tensor,
        order: torch.Tensor | None = None,
        *,
        steps: int,
        create_graph: bool,
        engine: Engine,
        forward: TaskForward,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: adapt on the support set (minibatch rows in ``order``); (query loss, outputs)."""
        adapted, _ = self._adapt(
            params, xs, ys, order, steps=steps, engine=engine, forward=forward, adam_steps=self._adam_steps()
        )
        out = query_forward(forward, {**params, **adapted}, xs, xq, self._nt)
        return self.loss_fn(out, yq), out

    def _adapt_one(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[Params, TaskForward]:
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        order = self._eval_order(support.unsqueeze(0))
        adapted, _ = self._adapt(
            params,
            support,
            labels,
            None if order is None else order[0],
            steps=self.inner_steps_test,
            engine="autograd",
            forward=self._forward_vec,
            adam_steps=self._adam_steps(),
        )
        return {**params, **{k: v.detach() for k, v in adapted.items()}}, self._forward_vec

    def _reptile_task(
        self,
        params: Params,
        xs: torch.Tensor,
        ys: torch.Tensor,
        xq: torch.Tensor,
        yq: torch.Tensor,
        order: torch.Tensor | None = None,
        *,
        engine: Engine,
        forward: TaskForward,
        adam_steps: int,
    ) -> tuple[Params, Params, torch.Tensor, torch.Tensor]:
        """One training task: (adapted parameters, second moments, query loss, query outputs)."""
        x_train, y_train = (torch.cat([xs, xq]), torch.cat([ys, yq])) if self.use_query else (xs, ys)
        adapted, moments = self._adapt(
            params,
            x_train,
            y_train,
            order,
            steps=self.inner_steps,
            engine=engine,
            forward=forward,
            adam_steps=adam_steps,
        )
        with torch.no_grad():
            out = query_forward(forward, {**params, **adapted}, xs, xq, self._nt)
            return adapted, moments, self.loss_fn(out, yq), out

    def _eval_data(self, batch: EpisodeBatch) -> tuple[torch.Tensor, ...]:
        data = super()._eval_data(batch)
        order = self._eval_order(batch.support)
        return data if order is None else (*data, order)

    # ---------------------------------------------------------------- Method API

    def loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Surrogate whose gradient is theta - mean(adapted theta); its value is the query loss."""
        self._check_batch(batch)
        named = dict(self.model.named_parameters())
        params = {k: v.detach() for k, v in named.items()}
        examples = batch.support.shape[1] + (batch.query.shape[1] if self.use_query else 0)
        order = self._minibatch_order(batch.tasks, examples, batch.support.device)
        data = (batch.support, batch.support_labels, batch.query, batch.query_labels)
        data = data if order is None else (*data, order)
        adam_steps = self._adam_steps()

        def accumulate(sums: Params, parts: Params, stacked: bool) -> None:
            for n, v in parts.items():
                v = v.sum(0) if stacked else v
                sums[n] = sums[n] + v if n in sums else v.clone()

        def vectorised() -> tuple[Params, Params, torch.Tensor, torch.Tensor]:
            fn = functools.partial(
                self._reptile_task, engine="func", forward=self._forward_vec, adam_steps=adam_steps
            )
            sums: Params = {}
            moment_sums: Params = {}
            losses, outs = [], []
            for part in zip(*(d.split(self._chunks(batch)) for d in data), strict=True):
                adapted, moments, loss_c, out_c = vmap_tasks(fn, (params,), part)
                accumulate(sums, adapted, True)
                accumulate(moment_sums, moments, True)
                losses.append(loss_c)
                outs.append(out_c)
            return sums, moment_sums, torch.cat(losses), torch.cat(outs)

        def loop() -> tuple[Params, Params, torch.Tensor, torch.Tensor]:
            fn = functools.partial(
                self._reptile_task, engine="autograd", forward=self._forward_loop, adam_steps=adam_steps
            )
            sums: Params = {}
            moment_sums: Params = {}
            losses, outs = [], []
            for t in range(batch.tasks):
                adapted, moments, loss_t, out_t = fn(params, *(d[t] for d in data))
                accumulate(sums, adapted, False)
                accumulate(moment_sums, moments, False)
                losses.append(loss_t)
                outs.append(out_t)
            return sums, moment_sums, torch.stack(losses), torch.stack(outs)

        sums, moment_sums, losses, outs = self.runner.run("train", vectorised, loop)
        if moment_sums and self.inner_steps > 0:
            self._absorb_moments(moment_sums, batch.tasks)
        loss = losses.mean().detach()
        surrogate = torch.zeros((), dtype=loss.dtype, device=loss.device)
        for name, total in sums.items():
            direction = (params[name] - total / batch.tasks).detach()
            surrogate = surrogate + (named[name] * direction).sum()
        value = loss + (surrogate - surrogate.detach())
        return value, batch_metrics(self.task, loss, outs, batch.query_labels)

    @torch.no_grad()
    def _absorb_moments(self, moment_sums: Params, tasks: int) -> None:
        """Fold a meta-batch's inner steps into the kept second moments.

        Each task's moments end at ``d * v0 + (1 - d) * u_t`` (``d = beta2 **
        steps``, ``u_t`` its own weighted mean of squared gradients). The kept
        state becomes ``D * v0 + (1 - D) * mean_t u_t`` with ``D = d ** tasks``:
        the decay of all the meta-batch's steps, every task weighted alike.
        """
        steps = self.inner_steps
        decay = ADAM_BETA2**steps
        total_decay = decay**tasks
        for name, total in moment_sums.items():
            start = self._moment(name)
            mean_u = (total / tasks - decay * start) / (1 - decay)
            start.copy_(total_decay * start + (1 - total_decay) * mean_u)
        self.inner_adam_steps += tasks * steps

    def describe(self) -> dict[str, object]:
        out = super().describe()
        out["method"] = self.name  # first order by definition: no "(first order)" label
        out["use_query"] = self.use_query
        out["first_order"] = True
        out["inner_batch"] = self.inner_batch
        out["inner_batch_test"] = self.inner_batch_test
        out["inner_optimizer"] = self.inner_optimizer
        return out


def _minibatch_rows(
    examples: int, size: int | None, steps: int, generators: Iterable[torch.Generator | None]
) -> torch.Tensor | None:
    """Rows of each step's minibatch, (tasks, steps * size), one task per generator (None: torch's
    global one): the first ``steps * size`` rows of back-to-back shuffles of ``range(examples)``.
    None when every step takes the whole set.
    """
    if size is None or size >= examples or steps == 0:
        return None
    needed = steps * size
    passes = -(-needed // examples)
    return torch.stack(
        [
            torch.cat([torch.randperm(examples, generator=g) for _ in range(passes)])[:needed]
            for g in generators
        ]
    )


def _seeded_by(task: torch.Tensor) -> torch.Generator:
    """A generator seeded by a tensor's bytes (any dtype): the same data, the same stream."""
    raw = task.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    digest = hashlib.blake2b(raw, digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
