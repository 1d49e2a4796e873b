"""Batch normalisation by task statistics, for gradient-based meta-learners.

MAML-style methods normalise every batch a task presents with that batch's
own statistics and keep no running averages. Two details make a dedicated
layer worthwhile:

* Second-order meta-gradients through ``F.batch_norm`` are wrong when the
  task dimension is vectorised with ``torch.func.vmap`` and the outer
  gradient is taken outside the ``vmap`` (functorch issue #534, pytorch
  issue #196699). Written with elementary
  operations (mean, variance, normalise, scale, shift) the meta-gradient is
  exact, which the tests check against a plain loop in float64.
* Non-transductive evaluation normalises queries with the *support* set's
  statistics. ``statistics_from(rows)`` asks every ``TaskBatchNorm`` in a
  forward pass to take its statistics from the first ``rows`` examples of
  the batch only, so a forward pass over ``cat(support, query)`` normalises
  the queries by the support statistics without any mutable layer state.

``convert_batchnorm`` swaps the ``nn.BatchNorm*`` layers of an existing model
(e.g. ``Conv4``) for ``TaskBatchNorm`` with the same parameter names, so
state dicts and parameter lists are unchanged apart from the running-statistics
buffers, which these methods never use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

_STATS_ROWS: ContextVar[int | None] = ContextVar("fewshot_stats_rows", default=None)


@contextlib.contextmanager
def statistics_from(rows: int | None) -> Iterator[None]:
    """Within the block, ``TaskBatchNorm`` takes statistics from the first ``rows`` examples.

    ``None`` (the default outside the block) means every example of the batch.
    """
    if rows is not None and rows < 1:
        raise ValueError(f"statistics_from(rows) needs rows >= 1 or None, got {rows}")
    token = _STATS_ROWS.set(rows)
    try:
        yield
    finally:
        _STATS_ROWS.reset(token)


def batch_moments(x: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance over every dim but 1, from the first ``rows`` rows.

    Elementary ops only (sums and products), whose second derivatives
    autograd and vmap get right. The variance is computed about a detached
    copy of the mean (a constant shift): numerically as safe as two passes,
    and the gradient needs no pass through the centred tensor's mean.
    """
    ref = x if rows is None else x[:rows]
    dims = [0, *range(2, x.dim())]
    count = ref.numel() // ref.shape[1]
    mean = ref.sum(dim=dims, keepdim=True) * (1.0 / count)
    pilot = mean.detach()
    shifted = ref - pilot
    var = (shifted * shifted).sum(dim=dims, keepdim=True) * (1.0 / count) - (mean - pilot) ** 2
    return mean, var


def task_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    rows: int | None = None,
) -> torch.Tensor:
    """Batch norm of ``x`` (B, C, ...) with statistics of its first ``rows`` rows (all if None).

    Written as one fused multiply-add ``x * scale + shift`` with per-channel
    ``scale`` and ``shift``, so the full-size tensor is touched once.
    """
    mean, var = batch_moments(x, rows)
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.view(shape)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.view(shape)
    return torch.addcmul(shift, x, scale)


class TaskBatchNorm(nn.Module):
    """Batch norm that always uses the statistics of the batch (or of its support rows).

    A drop-in for ``nn.BatchNorm1d/2d/3d`` inside MAML-family models: same
    ``weight``/``bias`` parameter names, no running statistics, identical in
    training and evaluation. See the module docstring for why it exists.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"TaskBatchNorm({self.num_features}) got input of shape {tuple(x.shape)}; "
                "expected (batch, channels, ...)"
            )
        rows = _STATS_ROWS.get()
        if rows is not None and rows > x.shape[0]:
            raise ValueError(f"statistics_from({rows}) but the batch has only {x.shape[0]} rows")
        return task_batch_norm(x, self.weight, self.bias, self.eps, rows)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


def outputs_independent(module: nn.Module) -> bool:
    """True when each example's output depends on that example alone, so a batch may be cut.

    That needs eval mode (the training path keeps its one call, and a
    training BatchNorm normalises by its batch) and no normalisation that
    uses the statistics of the batch it is given (TaskBatchNorm, or
    BatchNorm without running statistics).
    """
    return not module.training and not any(
        isinstance(m, TaskBatchNorm)
        or (isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats))
        for m in module.modules()
    )


def norms_wrong_under_vmap(module: nn.Module) -> list[str]:
    """Type names of the layers in ``module`` whose second-order gradients under vmap are wrong.

    Affine ``nn.LayerNorm`` and ``nn.InstanceNorm*`` run fused kernels with
    the batch-norm pitfall of the module docstring (functorch issue #534):
    second-order MAML through them under ``vmap`` is silently off (by 6e-4 to
    3e-2 relative, measured in float64). ``convert_batchnorm`` fixes batch
    norm; these have no elementary-op twin here. Without affine parameters,
    and for ``GroupNorm`` and ``RMSNorm``, the gradients are right.
    """
    found = {
        type(m).__name__
        for m in module.modules()
        if (isinstance(m, nn.LayerNorm) and m.weight is not None)
        or (isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.affine)
    }
    return sorted(found)


def convert_batchnorm(module: nn.Module) -> int:
    """Replace every ``nn.BatchNorm*`` inside ``module`` by ``TaskBatchNorm``, in place.

    Affine parameters are copied (same names, same values); running-statistics
    buffers are dropped. Returns how many layers were replaced.
    """
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = TaskBatchNorm(child.num_features, eps=child.eps, affine=child.affine)
            ref = _first_tensor(child)
            if ref is not None:
                new.to(device=ref.device, dtype=ref.dtype)
            if child.affine:
                with torch.no_grad():
                    new.weight.copy_(child.weight)
                    new.bias.copy_(child.bias)
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, new)
            replaced += 1
        else:
            replaced += convert_batchnorm(child)
    return replaced


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor
    return None


def conv_batch_norm_folded(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    eps: float = 1e-5,
    rows: int | None = None,
    padding: int = 1,
) -> torch.Tensor:
    """``task_batch_norm(conv2d(x, weight, conv_bias))`` computed as one matrix product.

    The conv output's per-channel mean and variance are linear and quadratic
    in the weights, so they follow exactly from the mean and covariance of
    the input patches: mean_c = w_c . m + b_c, var_c = w_c^T Cov w_c. The
    normalisation then folds into the weights and bias, and the
    full-resolution output is written once (by a matrix product of the
    patches, in channels-last order) instead of passing through a convolution
    and five element-wise operations and their first and second derivatives.
    Worth it when the input has few channels (the first layer on images):
    the patches are C_in k^2 wide. Stride 1, square kernels, (B, C, H, W) input.
    """
    batch, _, height, width = x.shape
    k = weight.shape[-1]
    patches = F.unfold(x, k, padding=padding)  # (B, C_in*k*k, L)
    ref = patches if rows is None else patches[:rows]
    count = ref.shape[0] * ref.shape[2]
    m = ref.sum(dim=(0, 2)) * (1.0 / count)
    centred = ref - m.detach()[:, None]  # a constant shift keeps the covariance accurate
    dev = m - m.detach()
    cov = torch.einsum("bkl,bjl->kj", centred, centred) * (1.0 / count) - torch.outer(dev, dev)
    w = weight.reshape(weight.shape[0], -1)  # (C_out, C_in*k*k)
    mean = w @ m
    if conv_bias is not None:
        mean = mean + conv_bias
    var = ((w @ cov) * w).sum(dim=1)
    scale = torch.rsqrt(var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    shift = -mean * scale if conv_bias is None else (conv_bias - mean) * scale
    if bn_bias is not None:
        shift = shift + bn_bias
    # One product with a ones column for the shift: (B*L, K+1) @ (K+1, C_out).
    ones = torch.ones_like(patches[:, :1])
    rows_in = torch.cat([patches, ones], dim=1).transpose(1, 2).reshape(-1, patches.shape[1] + 1)
    folded = torch.cat([(w * scale[:, None]).t(), shift[None, :]], dim=0)  # (K+1, C_out)
    out = rows_in @ folded  # (B*L, C_out): channels-last order
    out_h = height + 2 * padding - k + 1
    out_w = width + 2 * padding - k + 1
    return out.view(batch, out_h, out_w, -1).permute(0, 3, 1, 2)


@contextlib.contextmanager
def one_running_update(module: nn.Module) -> Iterator[Callable[[], None]]:
    """Forward several tasks one by one, normalising each by its own batch statistics, while
    the running statistics take a single update with the tasks' mean.

    Call the yielded ``task_done()`` after each task's forward pass. Each task
    then starts from the same running statistics, and at the end they are set
    to the mean of the tasks' updated ones: ``(1 - m) r + m * mean(task stats)``.
    That update is linear in the tasks, so a meta-batch split across processes
    and averaged (``distributed.average_buffers``) ends with exactly the
    running statistics of one process, and so with the same evaluation.

    Buffers are replaced by fresh tensors rather than overwritten, because
    autograd keeps the ones a BatchNorm forward pass used for its backward.
    """
    slots = [(m, name) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    if not module.training or not slots:
        yield lambda: None
        return
    start = [m._buffers[name] for m, name in slots]
    seen: list[list[torch.Tensor]] = []

    def fresh() -> None:
        for (m, name), value in zip(slots, start, strict=True):
            m._buffers[name] = value.detach().clone()

    def task_done() -> None:
        seen.append([m._buffers[name] for m, name in slots])
        fresh()

    fresh()
    yield task_done
    with torch.no_grad():
        for i, (m, name) in enumerate(slots):
            values = [s[i] for s in seen] or [start[i]]
            first = values[0]
            m._buffers[name] = torch.stack(values).mean(0) if first.is_floating_point() else first.clone()
