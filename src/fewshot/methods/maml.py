"""MAML, first-order MAML and ANIL, vectorised over tasks with torch.func.

* MAML: Finn, Abbeel & Levine (2017), "Model-Agnostic Meta-Learning for Fast
  Adaptation of Deep Networks". The meta-gradient differentiates through the
  inner gradient steps (second order); ``first_order=True`` treats the inner
  gradients as constants (the paper's first-order approximation).
* Per-step learnable learning rates (one per step and parameter tensor):
  Antoniou, Edwards & Storkey (2019), "How to train your MAML" (LSLR).
* ANIL: Raghu, Raghu, Bengio & Vinyals (2020), "Rapid Learning or Feature
  Reuse?". Only the head adapts; the backbone's features are computed once
  per task, outside the inner loop.

A meta-batch runs as one ``torch.func.vmap`` over the task dimension (the
"vmap" path) or task by task with ``torch.autograd.grad`` (the "loop" path,
used automatically when ``vmap`` cannot batch the model, or would get the
second-order meta-gradient wrong: affine LayerNorm or InstanceNorm in the
inner loop). Both give the same numbers. The loop path accumulates each
task's meta-gradient as it goes and returns a scalar whose value is the
meta-loss and whose gradient is the meta-gradient, so it holds one task's
graph at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from fewshot.data.episodes import EpisodeBatch
from fewshot.methods.base import Method, Predictor
from fewshot.methods.episode_checks import check_batch, check_task
from fewshot.methods.inner_loop import (
    BATCHNORM_MODES,
    TASKS,
    Engine,
    Params,
    TaskForward,
    TaskRunner,
    batch_metrics,
    check_steps,
    choose_forward,
    chunk_sizes,
    count_task_batchnorm,
    inner_loop,
    loop_tasks,
    meta_loss_by_chunks,
    module_forward,
    query_forward,
    task_loss_fn,
    vmap_tasks,
)
from fewshot.models.norm import TaskBatchNorm, convert_batchnorm, norms_wrong_under_vmap


class TaskPredictor:
    """A model adapted to one task: call it on inputs (M, *x) to get outputs (M, ...).

    ``params`` holds the adapted parameters (e.g. to check what moved).
    """

    def __init__(self, predict: Callable[[torch.Tensor], torch.Tensor], params: Params) -> None:
        self._predict = predict
        self.params = params

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._predict(x)


CHUNK_BYTES = 16 * 2**20
"""Automatic chunking keeps each vectorised chunk's largest activation under this many bytes."""


def _lr_key(name: str) -> str:
    """Parameter names contain dots, which ``nn.ParameterDict`` keys may not."""
    return name.replace(".", "__")


class MAML(Method):
    """Model-Agnostic Meta-Learning (Finn et al. 2017), second or first order.

    Args:
        model: the network to meta-learn (e.g. ``Classifier(Conv4(...), features, ways)``
            or ``MLP()`` for sinusoid regression). Its ``nn.BatchNorm*`` layers are
            replaced in place by ``TaskBatchNorm`` (same parameters, no running
            statistics); the method trains ``model``'s own parameters.
        inner_lr: inner-loop step size; a sequence gives one fixed step size per step
            (it must cover ``max(inner_steps, inner_steps_test)`` steps).
        inner_steps: gradient steps on the support set during meta-training (>= 0).
        inner_steps_test: steps when adapting for evaluation (``adapt``,
            ``query_logits``); defaults to ``inner_steps``.
        first_order: treat the inner gradients as constants (first-order MAML).
        per_step_lr: learn one step size per inner step and parameter tensor,
            initialised from ``inner_lr`` (Antoniou et al. 2019). Test steps beyond
            ``inner_steps`` reuse the last learned step size.
        batchnorm: "transductive" (each pass normalised by its own batch: support by
            support, queries by the query batch, as in the MAML paper) or
            "non-transductive" (queries normalised by the support statistics).
        adapt_batchnorm: take inner steps on the batch-norm weights and offsets too
            (True, the algorithm as written). False leaves them out of the inner loop
            and meta-learns them only, as Finn et al.'s code does (its batch-norm
            variables are not among the weights it adapts); first-order MAML learns
            much faster so (docs/results.md).
        task: "classification" (cross-entropy, labels 0..N-1) or "regression" (MSE).
        path: "auto" (vmap over tasks, falling back to a loop with a warning if vmap
            fails, or from the start for second order through affine LayerNorm or
            InstanceNorm layers, whose meta-gradients vmap gets wrong), "vmap" (refused
            in that case) or "loop".
        forward: "auto" (a fused Conv-4 forward on the vmap path when the model is a
            plain Conv-4 classifier, the module itself otherwise), "fused" or "module".
        chunk_size: tasks per vectorised chunk on the vmap path. ``None`` picks the
            largest chunk whose biggest activation stays under ``CHUNK_BYTES`` for the
            fused Conv-4 forward (cache- and allocator-friendly, and it bounds peak
            memory), and the whole meta-batch for other models.
    """

    name = "maml"

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float | Sequence[float] = 0.4,
        inner_steps: int = 1,
        inner_steps_test: int | None = None,
        first_order: bool = False,
        per_step_lr: bool = False,
        batchnorm: str = "transductive",
        adapt_batchnorm: bool = True,
        task: str = "classification",
        path: str = "auto",
        forward: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.inner_steps = check_steps("inner_steps", inner_steps)
        self.inner_steps_test = check_steps(
            "inner_steps_test", self.inner_steps if inner_steps_test is None else inner_steps_test
        )
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.first_order = bool(first_order)
        self.per_step_lr = bool(per_step_lr)
        self.batchnorm = batchnorm
        self.task = task
        self.loss_fn = task_loss_fn(task)
        self.model = model
        convert_batchnorm(model)
        self.batchnorm_layers = count_task_batchnorm(model)
        self.adapt_batchnorm = bool(adapt_batchnorm)
        self._norm_names = frozenset(
            f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules()
            if isinstance(module, TaskBatchNorm)
            for name, _ in module.named_parameters(recurse=False)
        )
        self._nt = batchnorm == "non-transductive" and self.batchnorm_layers > 0
        self._fixed_lrs = self._parse_lr(inner_lr)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive integer or None (automatic), got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.runner = TaskRunner(path, type(self).__name__)
        self._setup_forwards(forward)
        unsafe = [] if self.first_order else norms_wrong_under_vmap(self._inner_loop_module())
        if unsafe:
            self.runner.avoid_vmap(
                f"second-order meta-gradients through affine {' and '.join(unsafe)} layers are silently "
                "wrong under torch.func.vmap (PyTorch's batching rule for their fused backward, "
                "functorch issue #534; first order is unaffected)"
            )
        if not self._adapt_names():
            raise ValueError(
                f"{type(self).__name__}: the inner loop has no parameter to adapt (none requires "
                "grad, or adapt_batchnorm=False and every trainable one is a batch-norm parameter)"
            )
        self._setup_learning_rates()

    # ---------------------------------------------------------------- configuration

    def _parse_lr(self, inner_lr: float | Sequence[float]) -> list[float]:
        steps = max(self.inner_steps, self.inner_steps_test, 1)
        if isinstance(inner_lr, int | float) and not isinstance(inner_lr, bool):
            values = [float(inner_lr)]
        elif isinstance(inner_lr, Sequence) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in inner_lr
        ):
            values = [float(v) for v in inner_lr]
            if len(values) < max(self.inner_steps, self.inner_steps_test):
                raise ValueError(
                    f"inner_lr lists {len(values)} step sizes but up to "
                    f"{max(self.inner_steps, self.inner_steps_test)} inner steps are taken; "
                    "give one per step or a single float"
                )
        else:
            raise ValueError(f"inner_lr must be a float or a list of floats, got {inner_lr!r}")
        if any(v < 0 for v in values):
            raise ValueError(f"inner_lr must be >= 0, got {inner_lr!r}")
        if len(values) == 1:
            values = values * steps
        return values

    def _setup_forwards(self, forward: str) -> None:
        self._forward_vec, self.forward_vec_name = choose_forward(self.model, forward, True)
        self._forward_loop, self.forward_loop_name = choose_forward(self.model, forward, False)

    def _inner_loop_module(self) -> nn.Module:
        """The network the inner loop differentiates through (twice, for the second-order meta-gradient)."""
        return self.model

    def _check_batch(self, batch: EpisodeBatch) -> None:
        """Classification labels must be 0..N-1 with every class in the support set, as for the
        metric methods: a clear EpisodeError instead of an index error deep in the loss."""
        if self.task == "classification":
            check_batch(batch, with_query_labels=True)

    def _check_task(self, support: torch.Tensor, labels: torch.Tensor) -> None:
        """``_check_batch`` for one task's support set."""
        if self.task == "classification":
            check_task(support, labels)

    def _adapt_names(self) -> list[str]:
        """The parameters the inner loop steps on (all others are meta-learned only)."""
        return [
            n
            for n, p in self.model.named_parameters()
            if p.requires_grad and (self.adapt_batchnorm or n not in self._norm_names)
        ]

    def _setup_learning_rates(self) -> None:
        self.step_lrs = nn.ParameterDict()
        if self.per_step_lr and self.inner_steps > 0:
            ref = next(iter(self.model.parameters()))
            for name in self._adapt_names():
                init = torch.tensor(self._fixed_lrs[: self.inner_steps], dtype=ref.dtype, device=ref.device)
                self.step_lrs[_lr_key(name)] = nn.Parameter(init)

    def _lr_params(self) -> dict[str, torch.Tensor]:
        """The learnable step sizes, passed explicitly into the (vmapped) task function."""
        return dict(self.step_lrs.items())

    def _lr(self, lr_params: Mapping[str, torch.Tensor], step: int, name: str) -> float | torch.Tensor:
        if lr_params:
            lrs = lr_params[_lr_key(name)]
            return lrs[min(step, lrs.shape[0] - 1)]
        return self._fixed_lrs[min(step, len(self._fixed_lrs) - 1)]

    # ---------------------------------------------------------------- per-task function

    def _task(
        self,
        params: Params,
        lr_params: dict[str, torch.Tensor],
        xs: torch.Tensor,
        ys: torch.Tensor,
        xq: torch.Tensor,
        yq: torch.Tensor,
        *,
        steps: int,
        create_graph: bool,
        engine: Engine,
        forward: TaskForward,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapt on the support set, then return (query loss, query outputs) for one task."""
        lr = functools.partial(self._lr, lr_params)
        adapted = inner_loop(
            forward,
            self.loss_fn,
            params,
            self._adapt_names(),
            xs,
            ys,
            steps,
            lr,
            create_graph=create_graph,
            engine=engine,
        )
        out = query_forward(forward, adapted, xs, xq, self._nt)
        return self.loss_fn(out, yq), out

    def _adapt_one(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[Params, TaskForward]:
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        lr_params = {k: v.detach() for k, v in self._lr_params().items()}
        lr = functools.partial(self._lr, lr_params)
        adapted = inner_loop(
            self._forward_vec,
            self.loss_fn,
            params,
            self._adapt_names(),
            support,
            labels,
            self.inner_steps_test,
            lr,
            create_graph=False,
            engine="autograd",
        )
        return {k: v.detach() for k, v in adapted.items()}, self._forward_vec

    # ---------------------------------------------------------------- Method API

    def adapt(self, support: torch.Tensor, support_labels: torch.Tensor) -> Predictor:
        """Adapt to one task (``inner_steps_test`` steps) and return its predictor."""
        self._check_task(support, support_labels)
        params, forward = self._adapt_one(support, support_labels)
        support = support.detach()

        def predict(x: torch.Tensor) -> torch.Tensor:
            return query_forward(forward, params, support, x, self._nt)

        return TaskPredictor(predict, params)

    def loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean query loss after adaptation; its gradient is the meta-gradient."""
        self._check_batch(batch)
        params = dict(self.model.named_parameters())
        lr_params = self._lr_params()
        data = (batch.support, batch.support_labels, batch.query, batch.query_labels)
        kwargs = {"steps": self.inner_steps, "create_graph": not self.first_order}
        meta = list(self.parameters())
        vec = functools.partial(self._task, engine="func", forward=self._forward_vec, **kwargs)
        one = functools.partial(self._task, engine="autograd", forward=self._forward_loop, **kwargs)

        def vectorised() -> tuple[torch.Tensor, torch.Tensor]:
            def run(chunk: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
                return vmap_tasks(vec, (params, lr_params), chunk)

            return meta_loss_by_chunks(run, data, self._chunks(batch), meta)

        def loop() -> tuple[torch.Tensor, torch.Tensor]:
            def run(chunk: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
                return loop_tasks(one, (params, lr_params), chunk)

            return meta_loss_by_chunks(run, data, [1] * batch.tasks, meta)

        loss, outs = self.runner.run("train", vectorised, loop)
        return loss, batch_metrics(self.task, loss, outs, batch.query_labels)

    def _chunks(self, batch: EpisodeBatch) -> list[int]:
        """Chunk sizes for the vmap path (see ``chunk_size``)."""
        if self.chunk_size is not None:
            return chunk_sizes(batch.tasks, self.chunk_size)
        per_example = self._activation_per_example(batch.support.shape[2:])
        if per_example is None:
            return [batch.tasks]
        support, query = batch.support.shape[1], batch.query.shape[1]
        examples = max(support, query + (support if self._nt else 0))  # the largest single pass
        per_task = per_example * examples * batch.support.element_size()
        return chunk_sizes(batch.tasks, max(1, CHUNK_BYTES // max(per_task, 1)))

    def _activation_per_example(self, input_shape: torch.Size) -> int | None:
        """Elements of the largest activation per example, if the forward is the fused Conv-4."""
        if self.forward_vec_name != "fused-conv4" or len(input_shape) != 3:
            return None
        first = next(m for m in self.model.modules() if isinstance(m, nn.Conv2d))
        return first.out_channels * input_shape[1] * input_shape[2]

    def _eval_data(self, batch: EpisodeBatch) -> tuple[torch.Tensor, ...]:
        """The per-task tensors evaluation maps ``_task`` over (Reptile adds its minibatch order)."""
        return (batch.support, batch.support_labels, batch.query, batch.query_labels)

    def query_logits(self, batch: EpisodeBatch) -> torch.Tensor:
        """Outputs (T, N*Q, ...) for every query after ``inner_steps_test`` steps, batched over tasks."""
        self._check_batch(batch)
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        lr_params = {k: v.detach() for k, v in self._lr_params().items()}
        data = self._eval_data(batch)
        kwargs = {"steps": self.inner_steps_test, "create_graph": False}

        def vectorised() -> torch.Tensor:
            fn = functools.partial(self._task, engine="func", forward=self._forward_vec, **kwargs)
            sizes = self._chunks(batch)
            parts = zip(*(d.split(sizes) for d in data), strict=True)
            return torch.cat([vmap_tasks(fn, (params, lr_params), part)[1] for part in parts])

        def loop() -> torch.Tensor:
            fn = functools.partial(self._task, engine="autograd", forward=self._forward_loop, **kwargs)
            return loop_tasks(fn, (params, lr_params), data)[1]

        with torch.no_grad():
            return self.runner.run("eval", vectorised, loop).detach()

    def describe(self) -> dict[str, object]:
        """Settings results must record, including which path (vmap or loop) runs."""
        return {  # a first-order run says so in every result line, not only in its details
            "method": f"{self.name} (first order)" if self.first_order else self.name,
            "inner_steps": self.inner_steps,
            "inner_steps_test": self.inner_steps_test,
            "inner_lr": self._fixed_lrs[0] if len(set(self._fixed_lrs)) == 1 else list(self._fixed_lrs),
            "per_step_lr": self.per_step_lr,
            "first_order": self.first_order,
            "batchnorm": self.batchnorm,
            "batchnorm_layers": self.batchnorm_layers,
            # what the inner loop does, not the argument: ANIL never steps on batch norm
            "adapt_batchnorm": any(n in self._norm_names for n in self._adapt_names()),
            "task": self.task,
            "path": self.runner.used(),
            "forward": self.forward_vec_name,
            "forward_loop": self.forward_loop_name,
        }


class BackboneHead(nn.Module):
    """A backbone followed by a head: how ANIL sees a network."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class ANIL(MAML):
    """Almost No Inner Loop (Raghu et al. 2020): MAML that adapts only the head.

    ``ANIL(backbone, head, ...)`` or ``ANIL(model, ...)`` for a model with
    ``.backbone`` and ``.head`` (e.g. ``Classifier``) or ``.body`` and ``.head``
    (e.g. the sinusoid ``MLP``). The backbone is still
    meta-learned (through the query loss and, second order, through the head's
    adaptation), but its features are computed once per task, so the inner
    loop only runs the head. Other arguments as for ``MAML``.
    """

    name = "anil"

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None, **kwargs: object) -> None:
        if head is None:
            if isinstance(getattr(backbone, "head", None), nn.Module) and isinstance(
                getattr(backbone, "backbone", None), nn.Module
            ):
                model = backbone
            elif isinstance(getattr(backbone, "head", None), nn.Module) and isinstance(
                getattr(backbone, "body", None), nn.Module
            ):  # e.g. the sinusoid MLP: same parameter tensors, named backbone.* / head.*
                model = BackboneHead(backbone.body, backbone.head)
            else:
                raise ValueError(
                    "ANIL needs ANIL(backbone, head) or a model with .backbone (or .body) and .head "
                    "submodules (e.g. fewshot.models.backbones.Classifier or MLP)"
                )
        else:
            model = BackboneHead(backbone, head)
        if not any(p.requires_grad for p in model.head.parameters()):
            raise ValueError("ANIL's head has no trainable parameters to adapt")
        super().__init__(model, **kwargs)  # type: ignore[arg-type]

    def _setup_forwards(self, forward: str) -> None:
        self._forward_vec, self.forward_vec_name = choose_forward(self.model.backbone, forward, True)
        self._forward_loop, self.forward_loop_name = choose_forward(self.model.backbone, forward, False)
        self._head_forward = module_forward(self.model.head)
        self._nt = self.batchnorm == "non-transductive" and count_task_batchnorm(self.model.backbone) > 0

    def _adapt_names(self) -> list[str]:
        return [f"head.{n}" for n, p in self.model.head.named_parameters() if p.requires_grad]

    def _inner_loop_module(self) -> nn.Module:
        return self.model.head  # the backbone is differentiated once, outside the inner loop

    def _features(
        self, forward: TaskForward, bparams: Params, xs: torch.Tensor, xq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query features, once per task, under the batch-norm mode."""
        if self._nt:
            rows = xs.shape[0]
            feats = forward(bparams, torch.cat([xs, xq]), rows)
            return feats[:rows], feats[rows:]
        return forward(bparams, xs, None), forward(bparams, xq, None)

    @staticmethod
    def _split(params: Mapping[str, torch.Tensor]) -> tuple[Params, Params]:
        bparams = {k[len("backbone.") :]: v for k, v in params.items() if k.startswith("backbone.")}
        hparams = {k[len("head.") :]: v for k, v in params.items() if k.startswith("head.")}
        return bparams, hparams

    def _adapt_head(
        self,
        hparams: Params,
        lr_params: Mapping[str, torch.Tensor],
        feats: torch.Tensor,
        ys: torch.Tensor,
        steps: int,
        create_graph: bool,
        engine: Engine,
    ) -> Params:
        def lr(step: int, name: str) -> float | torch.Tensor:
            return self._lr(lr_params, step, f"head.{name}")

        names = [n[len("head.") :] for n in self._adapt_names()]
        return inner_loop(
            self._head_forward,
            self.loss_fn,
            hparams,
            names,
            feats,
            ys,
            steps,
            lr,
            create_graph=create_graph,
            engine=engine,
        )

    def _task(
        self,
        params: Params,
        lr_params: dict[str, torch.Tensor],
        xs: torch.Tensor,
        ys: torch.Tensor,
        xq: torch.Tensor,
        yq: torch.Tensor,
        *,
        steps: int,
        create_graph: bool,
        engine: Engine,
        forward: TaskForward,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bparams, hparams = self._split(params)
        fs, fq = self._features(forward, bparams, xs, xq)
        adapted = self._adapt_head(hparams, lr_params, fs, ys, steps, create_graph, engine)
        out = self._head_forward(adapted, fq, None)
        return self.loss_fn(out, yq), out

    def _adapt_one(self, support: torch.Tensor, labels: torch.Tensor) -> tuple[Params, TaskForward]:
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        lr_params = {k: v.detach() for k, v in self._lr_params().items()}
        bparams, hparams = self._split(params)
        with torch.no_grad():
            feats = self._forward_vec(bparams, support, None)
        head = self._adapt_head(hparams, lr_params, feats, labels, self.inner_steps_test, False, "autograd")
        adapted = {**params, **{f"head.{k}": v.detach() for k, v in head.items()}}
        return adapted, self._forward_vec

    def adapt(self, support: torch.Tensor, support_labels: torch.Tensor) -> Predictor:
        """Adapt the head to one task; the predictor runs backbone then adapted head."""
        self._check_task(support, support_labels)
        params, forward = self._adapt_one(support, support_labels)
        bparams, hparams = self._split(params)
        support = support.detach()

        def predict(x: torch.Tensor) -> torch.Tensor:
            if self._nt:
                rows = support.shape[0]
                feats = forward(bparams, torch.cat([support, x]), rows)[rows:]
            else:
                feats = forward(bparams, x, None)
            return self._head_forward(hparams, feats, None)

        return TaskPredictor(predict, params)
