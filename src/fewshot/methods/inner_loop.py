"""The shared functional inner loop of the gradient-based meta-learners.

MAML (Finn et al. 2017), first-order MAML, ANIL (Raghu et al. 2020),
Meta-SGD (Li et al. 2017) and Reptile (Nichol et al. 2018) all adapt a copy of
the network's parameters by a few gradient steps on a task's support set. This
module holds what they share:

* *task forwards*: pure functions ``forward(params, x, rows)`` of a parameter
  dict and one task's inputs. ``rows`` (or None) says that batch norm takes
  its statistics from the first ``rows`` examples only (non-transductive
  queries). ``module_forward`` wraps any ``nn.Module`` with
  ``torch.func.functional_call``; ``fused_conv4_forward`` is a hand-written
  forward with the same parameters as ``Conv4`` / ``Classifier(Conv4)`` that
  does less element-wise work (see its docstring and
  ``benchmarks/maml_speed.py`` for what it buys).
* ``inner_loop``: the gradient steps, with ``torch.func.grad`` (the batched
  path, run under ``vmap`` over tasks) or ``torch.autograd.grad`` (the
  loop-over-tasks path). Second order differentiates through the steps; first
  order treats the inner gradients as constants.
* ``TaskRunner``: runs a per-task function over a meta-batch with
  ``torch.func.vmap`` or a Python loop, falling back to the loop (with a
  warning, remembered) when ``vmap`` cannot batch the model but the loop
  can, or from the start when ``vmap`` would get the numbers wrong
  (``avoid_vmap``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fewshot.models.backbones import Classifier, Conv4
from fewshot.models.norm import (
    TaskBatchNorm,
    conv_batch_norm_folded,
    statistics_from,
    task_batch_norm,
)

Params = dict[str, torch.Tensor]
TaskForward = Callable[[Mapping[str, torch.Tensor], torch.Tensor, "int | None"], torch.Tensor]
"""forward(params, x, rows) -> outputs for one task; ``rows``: batch-norm statistics rows."""
LearningRate = Callable[[int, str], "float | torch.Tensor"]
"""lr(step, parameter name) -> a float, a scalar tensor or a tensor shaped like the parameter."""
Engine = Literal["func", "autograd"]
TaskKind = Literal["classification", "regression"]
PathName = Literal["auto", "vmap", "loop"]
BatchNormMode = Literal["transductive", "non-transductive"]

TASKS = ("classification", "regression")
PATHS = ("auto", "vmap", "loop")
BATCHNORM_MODES = ("transductive", "non-transductive")
FORWARDS = ("auto", "fused", "module")


# --------------------------------------------------------------------------- losses


def task_loss_fn(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy on labels 0..N-1 for classification, MSE for regression."""
    if task == "classification":
        return F.cross_entropy
    if task == "regression":
        return F.mse_loss
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def batch_metrics(
    task: str, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor
) -> dict[str, float]:
    """The metrics dict of ``Method.loss``: "loss" and "accuracy" (NaN for regression), plus "mse"."""
    out = {"loss": float(loss.detach())}
    if task == "classification":
        correct = outputs.detach().argmax(dim=-1) == targets
        out["accuracy"] = float(correct.float().mean())
    else:
        out["accuracy"] = float("nan")
        out["mse"] = float(F.mse_loss(outputs.detach(), targets))
    return out


# --------------------------------------------------------------------------- forwards


def module_forward(model: nn.Module) -> TaskForward:
    """A task forward for any module: ``functional_call`` under ``statistics_from(rows)``."""

    def forward(params: Mapping[str, torch.Tensor], x: torch.Tensor, rows: int | None) -> torch.Tensor:
        with statistics_from(rows):
            return functional_call(model, dict(params), (x,))

    return forward


def count_task_batchnorm(model: nn.Module) -> int:
    """How many ``TaskBatchNorm`` layers ``model`` has (non-transductive mode needs at least one)."""
    return sum(isinstance(m, TaskBatchNorm) for m in model.modules())


def _is_conv4_block(block: nn.Module) -> bool:
    if not isinstance(block, nn.Sequential) or len(block) != 4:
        return False
    conv, norm, relu, pool = block
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and type(norm) is TaskBatchNorm
        and norm.affine
        and type(relu) is nn.ReLU
        and type(pool) is nn.MaxPool2d
        and pool.kernel_size in (2, (2, 2))
        and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0))
        and pool.dilation in (1, (1, 1))
        and not pool.ceil_mode
        and not pool.return_indices
    )


FOLD_MAX_PATCH = 64
"""Fold batch norm into the first conv when C_in * 3 * 3 is at most this (1 or 3 input channels)."""


def fused_conv4_forward(model: nn.Module) -> TaskForward | None:
    """A faster task forward for ``Conv4`` or ``Classifier(Conv4, ...)``; None for other models.

    Same parameters and the same function as the module (checked against it
    in float64 by the tests), with two exact rewrites that cut element-wise
    work, which is where vectorised MAML spends its time on CPU:

    * the first layer's batch norm is folded into its convolution, its
      statistics computed from the input patches' mean and covariance
      (``conv_batch_norm_folded``): the 28x28x64 activation is written once
      instead of going through five element-wise ops and their derivatives;
    * ReLU is applied after max-pooling (they commute), on a 4x smaller tensor.

    Requires the model's batch norms to be ``TaskBatchNorm`` (``convert_batchnorm``).
    """
    if isinstance(model, Classifier) and isinstance(model.backbone, Conv4):
        backbone, prefix, head = model.backbone, "backbone.", model.head
        if type(head) is not nn.Linear:
            return None
    elif isinstance(model, Conv4):
        backbone, prefix, head = model, "", None
    else:
        return None
    blocks = list(backbone.blocks)
    if not blocks or not all(_is_conv4_block(b) for b in blocks):
        return None
    layers = []
    for i, block in enumerate(blocks):
        conv, norm = block[0], block[1]
        base = f"{prefix}blocks.{i}"
        conv_bias = f"{base}.0.bias" if conv.bias is not None else None
        fold = i == 0 and conv.in_channels * 9 <= FOLD_MAX_PATCH
        layers.append((f"{base}.0.weight", conv_bias, f"{base}.1.weight", f"{base}.1.bias", norm.eps, fold))

    def forward(params: Mapping[str, torch.Tensor], x: torch.Tensor, rows: int | None) -> torch.Tensor:
        h = x
        for conv_w, conv_b, bn_w, bn_b, eps, fold in layers:
            bias = params[conv_b] if conv_b is not None else None
            if fold:
                h = conv_batch_norm_folded(h, params[conv_w], bias, params[bn_w], params[bn_b], eps, rows)
            else:
                h = F.conv2d(h, params[conv_w], bias, padding=1)
                h = task_batch_norm(h, params[bn_w], params[bn_b], eps, rows)
            h = F.relu(F.max_pool2d(h, 2))
        h = h.flatten(1)
        if head is not None:
            h = F.linear(h, params["head.weight"], params.get("head.bias"))
        return h

    return forward


def choose_forward(model: nn.Module, forward: str, vectorised: bool) -> tuple[TaskForward, str]:
    """Pick the task forward: "fused" (Conv-4 rewrite), "module" (any model) or "auto".

    "auto" uses the fused forward on the vectorised path when the model is a
    plain Conv-4 (classifier) and the module forward otherwise, so the loop
    path stays the plain reference implementation.
    """
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
    fused = fused_conv4_forward(model) if forward in ("auto", "fused") else None
    if forward == "fused" and fused is None:
        raise ValueError(
            "forward='fused' needs a Conv4 or Classifier(Conv4, features, ways) whose batch norms "
            "are TaskBatchNorm; use forward='module' (or 'auto') for other models"
        )
    if fused is not None and (forward == "fused" or vectorised):
        return fused, "fused-conv4"
    return module_forward(model), "module"


def query_forward(
    forward: TaskForward,
    params: Mapping[str, torch.Tensor],
    support: torch.Tensor,
    query: torch.Tensor,
    non_transductive: bool,
) -> torch.Tensor:
    """Outputs for ``query`` under the batch-norm mode.

    Transductive: the query batch is normalised by its own statistics (as in
    the MAML paper's evaluation). Non-transductive: by the support set's, by
    running support and query together with statistics from the support rows.
    """
    if not non_transductive:
        return forward(params, query, None)
    rows = support.shape[0]
    return forward(params, torch.cat([support, query]), rows)[rows:]


# --------------------------------------------------------------------------- inner loop


def inner_loop(
    forward: TaskForward,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    adapt_names: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: LearningRate,
    *,
    create_graph: bool,
    engine: Engine,
) -> Params:
    """Take ``steps`` gradient steps on (x, y) from ``params``; returns the adapted dict.

    Only ``adapt_names`` move (all parameters for MAML, the head for ANIL).
    ``create_graph=True`` keeps the inner gradients in the graph, so the
    result is differentiable to second order (MAML); ``False`` treats them as
    constants (first-order MAML, Reptile, evaluation) while the update itself
    stays differentiable in the initial parameters and learning rates.
    ``engine="func"`` uses ``torch.func.grad`` (composable with ``vmap``);
    ``"autograd"`` uses ``torch.autograd.grad`` (the loop path).
    Support passes always normalise by support statistics.
    """
    # Under torch.no_grad() no outer graph can be recorded: the values are the same without it.
    create_graph = create_graph and torch.is_grad_enabled()
    current: Params = dict(params)
    for step in range(steps):
        grads = task_gradients(forward, loss_fn, current, adapt_names, x, y, create_graph, engine)
        for name in adapt_names:
            current[name] = current[name] - lr(step, name) * grads[name]
    return current


def task_gradients(
    forward: TaskForward,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Params,
    names: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    create_graph: bool,
    engine: Engine,
) -> Params:
    """Gradients of one task's loss on (x, y) with respect to the parameters ``names``.

    Under ``torch.inference_mode()`` the "autograd" engine cannot record a graph
    (``enable_grad`` does not lift it), so ``torch.func.grad`` takes the gradient:
    the same numbers, and both paths work there.
    """
    if not create_graph:
        # Constants: evaluate the gradient at detached values so no graph is kept.
        params = {k: v.detach() for k, v in params.items()}
        x = x.detach()
    if engine == "autograd" and torch.is_inference_mode_enabled():
        engine = "func"  # torch.enable_grad() does not lift inference mode; torch.func works there
    if engine == "func":

        def loss_of(sub: Params) -> torch.Tensor:
            return loss_fn(forward({**params, **sub}, x, None), y)

        return grad(loss_of)({n: params[n] for n in names})
    if engine != "autograd":
        raise ValueError(f"engine must be 'func' or 'autograd', got {engine!r}")
    with torch.enable_grad():
        if not create_graph:
            params = {k: (v.requires_grad_(True) if k in names else v) for k, v in params.items()}
        wrt = [params[n] for n in names]
        missing = [n for n, t in zip(names, wrt, strict=True) if not t.requires_grad]
        if missing:
            raise ValueError(
                f"parameters {missing} do not require grad, so they cannot be adapted; "
                "set requires_grad=True on them or leave them out of adaptation"
            )
        loss = loss_fn(forward(params, x, None), y)
        grads = torch.autograd.grad(loss, wrt, create_graph=create_graph, allow_unused=True)
    return {
        n: (g if g is not None else torch.zeros_like(t)) for n, g, t in zip(names, grads, wrt, strict=True)
    }


# --------------------------------------------------------------------------- task runner


class TaskRunner:
    """Runs a per-task function over a meta-batch, vectorised or task by task.

    ``path="vmap"`` always vectorises with ``torch.func.vmap``; ``"loop"``
    always loops; ``"auto"`` tries ``vmap`` on first use of each kind of call
    ("train", "eval") and, if it raises but the loop succeeds, warns once and
    loops from then on (if the loop raises too, the input is at fault: its
    error is raised and nothing is remembered).
    """

    def __init__(self, path: str, owner: str) -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.path = path
        self.owner = owner
        self.resolved: dict[str, str] = {}
        self.fallback_reason: str | None = None

    def path_for(self, kind: str) -> str:
        """The path this kind of call will take ("vmap", "loop", or "auto" if not yet tried)."""
        if self.path != "auto":
            return self.path
        if self.fallback_reason is not None:
            return "loop"
        return self.resolved.get(kind, "auto")

    def used(self) -> str:
        """A summary for ``describe()``: the configured path and what was used so far."""
        if self.path != "auto":
            return self.path
        if self.fallback_reason is not None:
            return "loop (vmap fallback)"
        return "vmap" if self.resolved else "auto (not run yet)"

    def run(
        self,
        kind: str,
        vectorised: Callable[[], object],
        loop: Callable[[], object],
    ) -> object:
        """Call ``vectorised()`` or ``loop()`` per the path; both must return the same result."""
        path = self.path_for(kind)
        if path == "loop":
            return loop()
        if path == "vmap":
            return vectorised()
        try:
            out = vectorised()
        except (RuntimeError, NotImplementedError) as err:
            failure = err
        else:
            self.resolved[kind] = "vmap"
            return out
        # Outside the except block: a user error (wrong dtype, a bad shape) fails the loop too,
        # and is raised as the loop raises it, with no vmap traceback and nothing remembered.
        out = loop()
        first_line = str(failure).strip().splitlines()[0] if str(failure).strip() else ""
        self.fallback_reason = f"{type(failure).__name__}: {first_line}"
        warnings.warn(
            f"{self.owner}: torch.func.vmap could not batch this model over tasks "
            f"({self.fallback_reason}). Using the loop-over-tasks path from now on: "
            "same results, slower. Pass path='loop' to choose it explicitly.",
            RuntimeWarning,
            stacklevel=4,
        )
        return out

    def avoid_vmap(self, reason: str) -> None:
        """Keep off ``vmap`` for good because it would give wrong numbers: "auto" loops (with a
        warning), "vmap" is refused with a ValueError, "loop" is unaffected."""
        if self.path == "vmap":
            raise ValueError(f"{self.owner}: path='vmap' cannot be used: {reason}. Use path='loop'.")
        if self.path == "auto":
            self.fallback_reason = reason
            warnings.warn(
                f"{self.owner}: {reason}. Using the loop-over-tasks path: exact, slower. "
                "Pass path='loop' to choose it explicitly.",
                RuntimeWarning,
                stacklevel=3,  # the caller of MAML(...)
            )


def vmap_tasks(
    fn: Callable[..., object], shared: tuple[object, ...], per_task: tuple[torch.Tensor, ...]
) -> object:
    """``vmap(fn)(*shared, *per_task)`` with the shared arguments unbatched (in_dims=None)."""
    in_dims = (None,) * len(shared) + (0,) * len(per_task)
    return vmap(fn, in_dims=in_dims, randomness="different")(*shared, *per_task)


def loop_tasks(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    shared: tuple[object, ...],
    per_task: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...]:
    """The same as ``vmap_tasks`` for functions returning a tuple of tensors, one task at a time."""
    outs = [fn(*shared, *(t[i] for t in per_task)) for i in range(per_task[0].shape[0])]
    return tuple(torch.stack(parts) for parts in zip(*outs, strict=True))


def chunk_sizes(tasks: int, max_chunk: int) -> list[int]:
    """Split ``tasks`` into near-equal chunks of at most ``max_chunk`` tasks."""
    max_chunk = max(1, min(max_chunk, tasks))
    count = -(-tasks // max_chunk)
    base, extra = divmod(tasks, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def meta_loss_by_chunks(
    run: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]],
    data: tuple[torch.Tensor, ...],
    sizes: Sequence[int],
    meta_params: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of per-task losses over a meta-batch, run chunk by chunk; returns (loss, outputs).

    ``run(chunk)`` returns per-task losses (c,) and outputs (c, ...). With one
    chunk the returned loss carries the whole graph. With several, each
    chunk's meta-gradient is taken at once and its graph freed (peak memory of
    one chunk), and the returned scalar equals the mean loss while its
    gradient with respect to ``meta_params`` is the accumulated meta-gradient.
    """
    tasks = data[0].shape[0]
    if len(sizes) == 1:
        losses, outs = run(data)
        return losses.mean(), outs
    meta = [p for p in meta_params if p.requires_grad]
    totals = [torch.zeros_like(p) for p in meta]
    losses_all, outs_all = [], []
    start = 0
    for size in sizes:
        chunk = tuple(d[start : start + size] for d in data)
        start += size
        losses, outs = run(chunk)
        if meta and losses.requires_grad:
            grads = torch.autograd.grad(losses.sum() / tasks, meta, allow_unused=True)
            for total, g in zip(totals, grads, strict=True):
                if g is not None:
                    total.add_(g)
        losses_all.append(losses.detach())
        outs_all.append(outs.detach())
    loss = torch.cat(losses_all).mean()
    if meta:
        surrogate = sum((p * g).sum() for p, g in zip(meta, totals, strict=True))
        loss = loss + (surrogate - surrogate.detach())
    return loss, torch.cat(outs_all)


def check_steps(name: str, value: int) -> int:
    """Validate an inner step count (0 means no adaptation)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value
