"""MAML meta-training speed and peak memory: vectorised (vmap) path vs loop path.

Setting (the MAML paper's 5-way 1-shot Omniglot shapes): Conv-4 with 64
filters on 28x28x1 images, one support and one query image per class,
meta-batch 32, one inner step, inner lr 0.4, Adam outer optimiser,
``torch.set_num_threads(2)``. Images are random tensors of that shape: speed
does not depend on their content, and no dataset is needed.

Run::

    python benchmarks/maml_speed.py            # about a minute
    python benchmarks/maml_speed.py --quick    # main figures only
    python benchmarks/maml_speed.py --rounds 9 # more repeats on a noisy machine

Speed: every configuration is built in this process and timed *round-robin*
(one meta-training step of each configuration in turn, ``--rounds`` times,
after one warm-up step each), and the median step time is reported as tasks/s.
Interleaving keeps the ratios fair on a shared, noisy machine: a burst of
load hits every configuration alike.

Peak memory: each configuration also runs in a fresh subprocess
(``--measure-memory NAME``, started before the timing runs) that builds the
method, takes three meta-training steps and reports its peak resident set
size: ``VmHWM`` from ``/proc/self/status`` on Linux (``getrusage``'s
``ru_maxrss`` elsewhere; on Linux that one also inherits the parent's peak
across fork/exec, so it is not used there). One process per configuration
keeps the peaks from mixing; the RSS right after building the model ("base",
mostly the torch import) is reported too, so the increment can be read off.

The last line of stdout is one JSON object (keys so_tasks_per_s,
fo_tasks_per_s, loop_so_tasks_per_s, loop_fo_tasks_per_s, ratio_so, ratio_fo,
mem_ratio_so, ...).

What each idea gave (tasks/s at these settings, three full runs of this script
with ``--ablation`` on 2 cores of an AMD EPYC (Zen 4) VM that other jobs
shared, so figures move by +-15% between runs; ratios within a run hold better;
a fourth run on a later day added the Winograd row and moved grouped conv to 49
against 71 for the default path):

| configuration                                        | 2nd order | 1st order |
|------------------------------------------------------|-----------|-----------|
| loop path, module forward (the plain reference)      | 32-33     | 53-58     |
| naive vmap (module forward, whole meta-batch)        | 42-55     | 90-104    |
| vmap + fused Conv-4 forward, whole meta-batch        | 77-82     | 137-154   |
| vmap + fused forward + chunks (the default path)     | 64-77     | 110-134   |
| loop path with the fused forward (for reference)     | 34-38     | 67-78     |
| hand-batched grouped conv (groups=T), no vmap        | 24-49     | 86-96     |
| fused, first layer as 4x4 super-patches + amax       | 59        | 106       |
| forward-over-reverse meta-gradient (jvp of grad)     | 55        |           |
| Winograd F(2x2, 3x3) convolutions in layers 2-4      | 40        |           |

Peak RSS (base ~297 MB): loop 355 / 338-339 MB (SO / FO); default vmap path
562-574 / 467-474 MB; vmap with the whole meta-batch at once 765 / 603 MB; naive vmap
1148 MB.

* Elementary-op batch norm (needed anyway: second-order meta-gradients through
  ``F.batch_norm`` under vmap are silently wrong, functorch #534) written
  as one ``addcmul`` with a variance about a detached pilot mean: the naive
  vmap row. The same module under the loop path is the reference row.
* The fused forward is the big win (+45-85% over naive vmap). Most of vectorised MAML's time
  goes to element-wise work on the 28x28x64 first-layer activations and their
  first and second derivatives. Folding the first batch norm into the first
  convolution through the input patches' mean and covariance, and computing
  that layer as one matrix product in channels-last order, removes most of
  it; ReLU after max-pooling (same function) acts on 4x fewer elements.
* Chunking the meta-batch (16 MB of first-layer activation per chunk, 16 tasks
  here; each chunk's meta-gradient is taken and its graph freed before the
  next) is there for memory: it keeps the second-order peak within 2x of the
  loop's (562 vs 765 MB). Its effect on speed was within the noise
  (-10% to +10%): less page-faulting on fresh 32 MB blocks, more passes.
* Rejected: grouped convolution by hand (stack the T tasks' weights, one conv
  with groups=T, autograd on the stacked parameters) is slower at second
  order, because PyTorch's convolution double backward loops over the groups
  (``_convolution_double_backward``) where vmap's batching rules do not; the
  super-patch first layer (the four 3x3 windows of each pooling cell as one
  4x4 patch, then ``amax``) was slower than the fold + ``max_pool2d``;
  channels-last inside vmap is not available (``NYI: querying is_contiguous
  inside of vmap``); ``mallopt`` (no mmap for large blocks) and transparent
  huge pages (``THP_MEM_ALLOC_ENABLE=1``) gave no consistent gain. Nor did
  running the chunks two at a time, each in its own Python thread with one
  intra-op thread (so the small, serial parts of one chunk overlap the
  other's): chunks of 16, 8 and 4 tasks gave 80-84, 81-88 and 78 tasks/s
  against 74-86 for the default in the same three round-robin runs.
* Rejected: the meta-gradient by forward over reverse instead of reverse
  over reverse (``make_forward_hvp_step``, timed with ``--ablation``): per
  task, (I - lr H) g_q with the Hessian-vector product from
  ``torch.func.jvp`` of ``torch.func.grad``, exact (1e-6 relative in float32
  against the default path). Forward-mode derivatives avoid max-pooling's
  scatter-based double backward, but the product needs the support pass
  twice (once for the adapted weights, once under ``jvp``) and the
  forward-mode formulas of the convolution and batch-norm backward are no
  cheaper: 55 against 79 tasks/s in the same run, so the default stays
  reverse over reverse.
* Rejected: Winograd's F(2x2, 3x3) convolution for the three 64-channel
  layers (``make_winograd_step``, timed with ``--ablation``): 16
  multiplications per 2x2 output tile and channel pair instead of 36, every
  transform a matrix product, so the meta-gradient stays exact (2.7e-15
  relative to the loop path in float64, with all three layers so replaced).
  The transforms' tile copies and permutes cost more than the
  multiplications save: 40 against 71 tasks/s in the same run (one layer
  alone, the 14x14 one, 55 against 70 in a first prototype).
* Rejected: ``torch.compile`` (inductor, with the system C++ compiler) of the
  fused second-order meta-loss, the whole meta-batch under ``vmap``, timed
  alone in one process against the same function eager. Compiled with the
  outer gradient by ``.backward()`` (as the default path takes it): 79
  against 76 tasks/s after 63 s of compilation. Compiled as one functional
  ``grad(mean of vmap(task meta-loss))``: 62 against 58 tasks/s after 86 s.
  Both compiled meta-gradients were *wrong*, 1.4 relative (float32) to the
  eager one, while the eager variants agree exactly. A few percent of speed
  is not worth a silently wrong gradient and a compiler requirement.
* Why second order stops near 2.3x: its convolutions alone are about 10 conv
  passes per layer (support forward, data and weight gradients, query forward
  and backward, four terms of the double backward), about 30 GFLOP per
  meta-batch here; at the ~130 GFLOP/s these convolutions reach on this
  machine that is ~235 ms, i.e. at most ~135 tasks/s with no other work at
  all, while the plain loop already runs at 32-40 tasks/s. 3x the loop would
  leave under 90 ms per meta-batch for everything that is not convolution.
  ``torch.utils.flop_counter`` counts 1.16 GFLOP per task for the loop path's
  second-order step (37 GFLOP per meta-batch). A profile of the default path
  puts max-pooling's double backward (a zero-filled scatter over the 28x28x64
  activations) at about a quarter of the step; a reshape + ``amax`` pool, whose
  derivatives are element-wise masks, measured 46 against 67 tasks/s under
  vmap, so it was not kept. Nor was a mask pool on the channels-last
  first-layer output (a detached one-hot of each window's first maximum, so
  ties resolve as in ``max_pool2d``; then multiply and sum, whose
  derivatives are element-wise): in isolation, a second-order meta-gradient
  through the first layer and its pool under ``vmap`` took 1.0 s against
  0.52 s with ``max_pool2d`` (16 tasks of 10 images, float32; timed
  round-robin beside a training run, so only the ratio counts).

* Rejected: ``torch.set_flush_denormal(True)`` (80.3 against 80.6 tasks/s
  for the vectorised path, the loop 37.1 against 33.8, in back-to-back runs
  of the two) and ``torch.backends.mkldnn.enabled = False`` (34.0 and 22.6:
  PyTorch's own convolutions are far slower than oneDNN's here).
* Rejected: the first layer's max-pool taken inside its folded matrix
  product: the four positions of every 2x2 window as four row blocks of
  the product, so the 28x28x64 output is never formed, and the maximum as
  three element-wise steps ``a + relu(b - a)`` (the first maximum wins a
  tie, as in ``max_pool2d``), whose derivatives of every order are
  element-wise. Exact (1e-15 relative in float64 against the default
  path), and a profile of the step lost max-pooling's zero-filled
  scatters, but the time did not follow: 66.8 against 65.9 tasks/s at
  second order and 122.7 against 123.2 at first order (medians of 41
  interleaved rounds, two threads, on the Intel Xeon host the VM had moved
  to; four shorter runs between -8% and +12%;
  +15% with one thread beside a training run). ``torch.maximum`` in place
  of ``a + relu(b - a)`` was slower (16 against 20 tasks/s, one thread
  beside the same run: its backward's ``masked_fill_`` took 9.5 ms a call
  under vmap), and ``torch.where`` too (45 against 55, two threads).
* Rejected, on the Intel host (per-round speed ratios against the default
  path, medians of 15 to 25 interleaved rounds, two threads): uniform
  channels-last activations. The default path's tensors come in three
  physical layouts (channels-last from the folded first layer and from the
  convolutions with the shared initial weights; NCHW, images before tasks,
  from vmap's grouped convolutions with per-task weights), so element-wise
  ops mix strides, and the query pass pools NCHW tensors, for which this
  torch build's ``max_pool2d_with_indices`` is 10 to 19 times slower than
  for channels-last ones (4.8 against 0.46 ms at 80x64x14x14). Copying
  every convolution output of layers 2-4 to channels-last (``permute``,
  ``contiguous``, ``permute``, which vmap accepts where ``memory_format``
  queries are not implemented) gave 1.03x at second order (per round 0.83
  to 1.14), 1.03x at first order, 0.99x for Reptile's 5-way 1-shot preset
  and for MAML's 20-way 1-shot preset (five inner steps): not kept. (The
  module forward, which the metric methods use, gains 1.5x from
  channels-last weights, which ``build_method`` gives them: it pools at
  full resolution, where the fused forward pools channels-last already.)
* Rejected: a custom ``torch.autograd.Function`` for the 3x3 convolutions
  of layers 2-4. PyTorch's double backward of a convolution computes the
  term "weight gradient of the data gradient" as a forward convolution of
  the transposed tensors with a 14x14 kernel (16.6 ms a call at layer 2 in
  the step, against 5.3 ms for oneDNN's backward-weights primitive on the
  same numbers). A Function whose backward is written with primal ops
  (``conv_transpose2d`` for the data gradient, ``convolution_backward``
  with only the weight output for the weight gradient;
  ``generate_vmap_rule``) removes that call and is exact (1.7e-15 relative
  to the loop path in float64), but measured 0.97x: the Python backward
  under vmap and grad costs what the kernel saves.
* Not pursued: oneDNN's bf16 arithmetic for float32 convolutions
  (``torch.backends.mkldnn.conv.fp32_precision = "bf16"``, AMX on the Intel
  host): 1.2 to 1.3x on a layer-2 convolution's forward and backward, for
  8-bit mantissas in every meta-gradient.

Finn et al.'s own Omniglot network (``Conv4(pool="stride")``, the
``conv4-strided`` backbone: stride-2 convolutions, no max-pooling, features
averaged over space) is timed too, as ``strided-vmap-so`` and
``strided-loop-so`` with the JSON keys ``strided_so_tasks_per_s``,
``strided_loop_so_tasks_per_s`` and ``strided_ratio_so``. It is not the
issue's Conv-4, so its figures stand beside the main ones and never replace
them. Three runs on one day (on an Intel Xeon host): 140.5 against 44.0
tasks/s (3.19x; main figures 66.1 against 29.3, 2.25x), 132.3 against
51.5 (2.57x, ``--rounds 3``; main 2.14x) and 127.2 against 51.0 (2.50x;
main 2.52x). About twice
the main path's speed, but its ratio to its own loop is no steadier and
not reliably 3x either; and that network trains worse on Omniglot here
(docs/results.md, *MAML: the reference code's Omniglot network*), so the
presets keep max-pooling.

malloc: the script runs with the ``fewshot`` command's settings, which keep
freed memory (``fewshot/allocator.py``); they gain Prototypical Networks'
60-way episodes 1.7x but change little here, where the chunks keep blocks
near 16 MB: 83.8 / 40.9 tasks/s (vmap / loop, second order) tuned against
80.4 / 39.6 with the system's settings, two runs the same day.

learn2learn 0.2.0 side by side: ``benchmarks/maml_vs_learn2learn.py``, run
in the separate environment that ``benchmarks/learn2learn_env.sh`` builds
(learn2learn needs torchvision, which does not import beside this torch),
times its ``clone()/adapt()`` loop on the same network and tasks, round-robin
with this script's four main configurations in one process. On the Intel
host, torch 2.14.1, ``--rounds 9``: learn2learn 30.7 (2nd order) and 64.2
(1st order) tasks/s, this project's loop path 28.1 and 50.1, the vectorised
path 68.9 and 130.8 (2.25x and 2.04x learn2learn's). The 19 and 41 tasks/s
first given for learn2learn were measured on an earlier, slower host.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from fewshot.allocator import malloc_mode, tune_malloc
from fewshot.data.episodes import EpisodeBatch
from fewshot.methods.inner_loop import TaskForward
from fewshot.methods.maml import MAML
from fewshot.models.backbones import Classifier, Conv4
from fewshot.models.norm import conv_batch_norm_folded, task_batch_norm

TASKS, WAYS, SHOTS, QUERIES, SIZE = 32, 5, 1, 1, 28
INNER_LR = 0.4

CONFIGS: dict[str, dict[str, object]] = {
    "vmap-so": {"first_order": False, "path": "vmap"},
    "loop-so": {"first_order": False, "path": "loop"},
    "vmap-fo": {"first_order": True, "path": "vmap"},
    "loop-fo": {"first_order": True, "path": "loop"},
}
ABLATION: dict[str, dict[str, object]] = {
    "naive-vmap-so": {"first_order": False, "path": "vmap", "forward": "module", "chunk_size": TASKS},
    "fused-unchunked-so": {"first_order": False, "path": "vmap", "chunk_size": TASKS},
    "loop-fused-so": {"first_order": False, "path": "loop", "forward": "fused"},
    "naive-vmap-fo": {"first_order": True, "path": "vmap", "forward": "module", "chunk_size": TASKS},
    "fused-unchunked-fo": {"first_order": True, "path": "vmap", "chunk_size": TASKS},
    "loop-fused-fo": {"first_order": True, "path": "loop", "forward": "fused"},
}
STRIDED: dict[str, dict[str, object]] = {
    "strided-vmap-so": {"first_order": False, "path": "vmap", "pool": "stride"},
    "strided-loop-so": {"first_order": False, "path": "loop", "pool": "stride"},
}
"""Finn et al.'s own Omniglot network (stride-2 convolutions, no max-pool): not the
issue's Conv-4, so reported beside the main figures, never in their place."""


def make_batch(seed: int = 0) -> EpisodeBatch:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS).repeat_interleave(SHOTS).expand(TASKS, -1).clone()
    qlabels = torch.arange(WAYS).repeat_interleave(QUERIES).expand(TASKS, -1).clone()
    return EpisodeBatch(
        support=torch.rand(TASKS, WAYS * SHOTS, 1, SIZE, SIZE, generator=gen),
        support_labels=labels,
        query=torch.rand(TASKS, WAYS * QUERIES, 1, SIZE, SIZE, generator=gen),
        query_labels=qlabels,
    )


def make_step(
    config: dict[str, object], batch: EpisodeBatch, forward_vec: TaskForward | None = None
) -> Callable[[], None]:
    """One meta-training step (loss, backward, Adam) of a fresh MAML (``forward_vec``: its vmap forward)."""
    torch.manual_seed(0)
    config = dict(config)
    backbone = Conv4(1, 64, 4, track_running_stats=False, pool=config.pop("pool", "max"))  # type: ignore[arg-type]
    model = Classifier(backbone, 64, WAYS)
    method = MAML(model, inner_lr=INNER_LR, **config)
    if forward_vec is not None:
        method._forward_vec = forward_vec
    optimiser = torch.optim.Adam(method.parameters(), lr=1e-3)

    def step() -> None:
        optimiser.zero_grad()
        loss, _ = method.loss(batch)
        loss.backward()
        optimiser.step()

    return step


def make_grouped_step(first_order: bool, batch: EpisodeBatch) -> Callable[[], None]:
    """The rejected idea, for the record: hand-batched Conv-4 with groups=T, no vmap.

    Parameters stacked over tasks, one grouped convolution per layer, batch
    norm by elementary ops over (B, T*C, H, W), inner gradients by
    ``torch.autograd.grad`` of the summed task losses (tasks are independent,
    so each task's slice is its own gradient).
    """
    torch.manual_seed(0)
    model = Classifier(Conv4(1, 64, 4, track_running_stats=False), 64, WAYS)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    names = [n for n, _ in model.named_parameters()]

    def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        tasks, b = x.shape[:2]
        h = x.transpose(0, 1).reshape(b, -1, SIZE, SIZE)
        for i in range(4):
            w, bias = p[f"backbone.blocks.{i}.0.weight"], p[f"backbone.blocks.{i}.0.bias"]
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), bias.reshape(-1), padding=1, groups=tasks)
            mean = h.mean(dim=(0, 2, 3), keepdim=True)
            var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
            gamma = p[f"backbone.blocks.{i}.1.weight"].reshape(1, -1, 1, 1)
            beta = p[f"backbone.blocks.{i}.1.bias"].reshape(1, -1, 1, 1)
            h = F.relu(F.max_pool2d((h - mean) * torch.rsqrt(var + 1e-5) * gamma + beta, 2))
        feats = h.reshape(b, tasks, -1)
        return torch.einsum("btf,tnf->tbn", feats, p["head.weight"]) + p["head.bias"][:, None]

    def task_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, n = logits.shape[1:]
        return F.cross_entropy(logits.reshape(-1, n), labels.reshape(-1), reduction="sum") / b

    def step() -> None:
        optimiser.zero_grad()
        stacked = {n: p.unsqueeze(0).expand(TASKS, *p.shape) for n, p in model.named_parameters()}
        inner = {n: v.detach().requires_grad_() for n, v in stacked.items()} if first_order else stacked
        loss = task_losses(forward(inner, batch.support), batch.support_labels)
        grads = torch.autograd.grad(loss, [inner[n] for n in names], create_graph=not first_order)
        fast = {n: stacked[n] - INNER_LR * g for n, g in zip(names, grads, strict=True)}
        (task_losses(forward(fast, batch.query), batch.query_labels) / TASKS).backward()
        optimiser.step()

    return step


def make_forward_hvp_step(batch: EpisodeBatch) -> Callable[[], None]:
    """A rejected idea, for the record: the second-order meta-gradient by forward over reverse.

    With one inner step the meta-gradient is (I - lr H_s) g_q, where H_s is the
    support loss's Hessian at the initialisation and g_q the query gradient at
    the adapted weights. Per task, under vmap: g_s = grad(support loss),
    g_q = grad(query loss) at theta - lr g_s, and H_s g_q by ``torch.func.jvp``
    of ``grad`` (exact; checked against the default path in float64 while it
    was tried). Same fused forward and chunks as the default path.
    """
    torch.manual_seed(0)
    model = Classifier(Conv4(1, 64, 4, track_running_stats=False), 64, WAYS)
    method = MAML(model, inner_lr=INNER_LR)
    forward = method._forward_vec
    params = dict(model.named_parameters())
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_of(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward(p, x, None), y)

    support_gradient = grad(loss_of)

    def task(
        p: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        g_s = support_gradient(p, xs, ys)
        g_q = grad(loss_of)({k: p[k] - INNER_LR * g_s[k] for k in p}, xq, yq)
        _, hvp = jvp(lambda q: support_gradient(q, xs, ys), (p,), (g_q,))
        return {k: g_q[k] - INNER_LR * hvp[k] for k in p}

    chunk = 16
    data = (batch.support, batch.support_labels, batch.query, batch.query_labels)

    def step() -> None:
        detached = {k: v.detach() for k, v in params.items()}
        for start in range(0, TASKS, chunk):
            part = tuple(d[start : start + chunk] for d in data)
            grads = vmap(task, in_dims=(None, 0, 0, 0, 0))(detached, *part)
            for k, v in params.items():
                total = grads[k].sum(0) / TASKS
                v.grad = total if start == 0 else v.grad + total
        optimiser.step()

    return step


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for 3x3 kernels by Winograd's F(2x2, 3x3).

    Each 2x2 output tile from a 4x4 input tile with 16 multiplications per
    channel pair instead of 36: the input and kernel transforms (B^T d B,
    G g G^T) and the output transform (A^T m A) as products with their
    Kronecker matrices, the 16 transformed products as one batched matrix
    product. Every step is linear, so autograd and vmap differentiate it to
    any order with matrix products only.
    """
    b_t = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=x.dtype)
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=x.dtype)
    a_t = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=x.dtype)
    n, c, h, w = x.shape
    out_c = weight.shape[0]
    th, tw = (h + 1) // 2, (w + 1) // 2
    padded = F.pad(x, (1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))
    tiles = F.unfold(padded, 4, stride=2).view(n, c, 16, th * tw)
    v = torch.matmul(torch.kron(b_t, b_t), tiles).permute(2, 1, 0, 3).reshape(16, c, -1)
    u = torch.kron(g, g) @ weight.reshape(out_c, c, 9).permute(2, 0, 1).reshape(9, -1)
    m = torch.bmm(u.view(16, out_c, c), v)  # (16, C_out, tiles)
    y = (torch.kron(a_t, a_t) @ m.view(16, -1)).view(2, 2, out_c, n, th, tw)
    y = y.permute(3, 2, 4, 0, 5, 1).reshape(n, out_c, 2 * th, 2 * tw)[:, :, :h, :w]
    return y if bias is None else y + bias[:, None, None]


def make_winograd_step(batch: EpisodeBatch) -> Callable[[], None]:
    """A rejected idea, for the record: layers 2-4 as Winograd F(2x2, 3x3) convolutions.

    The default path's fused forward with ``F.conv2d`` in blocks 1-3
    replaced by ``winograd_conv3x3`` (2.25x fewer multiplications in the
    transformed products), under the same vmap, chunks and second-order
    meta-gradient. Checked here against ``F.conv2d`` in float64 first.
    """
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 7, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 8, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(winograd_conv3x3(x, w, b), F.conv2d(x, w, b, padding=1))

    def forward(p: Mapping[str, torch.Tensor], x: torch.Tensor, rows: int | None) -> torch.Tensor:
        h = x
        for i in range(4):
            name = f"backbone.blocks.{i}"
            w, bias, gamma, beta = (p[f"{name}.{k}"] for k in ("0.weight", "0.bias", "1.weight", "1.bias"))
            if i == 0:
                h = conv_batch_norm_folded(h, w, bias, gamma, beta, rows=rows)
            else:
                h = task_batch_norm(winograd_conv3x3(h, w, bias), gamma, beta, rows=rows)
            h = F.relu(F.max_pool2d(h, 2))
        return F.linear(h.flatten(1), p["head.weight"], p["head.bias"])

    return make_step(CONFIGS["vmap-so"], batch, forward_vec=forward)


def time_round_robin(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median tasks/s per configuration, timing one step of each in turn."""
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: TASKS / statistics.median(ts) for name, ts in times.items()}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    Linux's ``VmHWM`` (per address space, so it starts afresh at ``exec``);
    elsewhere ``getrusage``'s ``ru_maxrss``, which on Linux would also carry
    over the parent's peak from before the ``fork``/``exec``.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def measure_memory_here(name: str) -> dict[str, float]:
    """Build one configuration, take three steps, return base and peak RSS (MB)."""
    torch.set_num_threads(2)
    batch = make_batch()
    config = {**CONFIGS, **ABLATION, **STRIDED}[name]
    step = make_step(config, batch)
    base = peak_rss_mb()
    for _ in range(3):
        step()
    return {"base_mb": base, "peak_mb": peak_rss_mb()}


def measure_memory(name: str) -> dict[str, float]:
    """Run ``measure_memory_here`` in a fresh interpreter, so peaks never mix."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, __file__, "--measure-memory", name],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--quick", action="store_true", help="skip the ablation rows")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also time the rejected hand-written variants (grouped conv, forward over reverse, Winograd)",
    )
    parser.add_argument("--measure-memory", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        print(json.dumps(measure_memory_here(args.measure_memory)))
        return

    tune_malloc()  # as the fewshot command runs: freed memory kept (fewshot/allocator.py)
    # Memory first, from a small parent process; each configuration in its own interpreter.
    memory = {name: measure_memory(name) for name in CONFIGS}

    torch.set_num_threads(2)
    batch = make_batch()
    configs = dict(CONFIGS) if args.quick else {**CONFIGS, **ABLATION, **STRIDED}
    steps = {name: make_step(cfg, batch) for name, cfg in configs.items()}
    if args.ablation:
        steps["grouped-so"] = make_grouped_step(False, batch)
        steps["grouped-fo"] = make_grouped_step(True, batch)
        steps["forward-hvp-so"] = make_forward_hvp_step(batch)
        steps["winograd-so"] = make_winograd_step(batch)
    print(
        f"MAML, Conv-4 64 filters, {WAYS}-way {SHOTS}-shot {QUERIES}-query 28x28x1, "
        f"meta-batch {TASKS}, 1 inner step, lr {INNER_LR}, Adam, 2 threads, {args.rounds} rounds"
    )
    speed = time_round_robin(steps, args.rounds)
    for name, value in speed.items():
        print(f"  {name:20s} {value:7.1f} tasks/s")

    for name, mem in memory.items():
        print(
            f"  {name:20s} peak RSS {mem['peak_mb']:7.0f} MB (base {mem['base_mb']:.0f} MB, "
            f"+{mem['peak_mb'] - mem['base_mb']:.0f} MB)"
        )

    result = {
        "so_tasks_per_s": round(speed["vmap-so"], 2),
        "fo_tasks_per_s": round(speed["vmap-fo"], 2),
        "loop_so_tasks_per_s": round(speed["loop-so"], 2),
        "loop_fo_tasks_per_s": round(speed["loop-fo"], 2),
        "ratio_so": round(speed["vmap-so"] / speed["loop-so"], 3),
        "ratio_fo": round(speed["vmap-fo"] / speed["loop-fo"], 3),
        "mem_ratio_so": round(memory["vmap-so"]["peak_mb"] / memory["loop-so"]["peak_mb"], 3),
        "mem_ratio_fo": round(memory["vmap-fo"]["peak_mb"] / memory["loop-fo"]["peak_mb"], 3),
        "peak_mb": {name: round(mem["peak_mb"]) for name, mem in memory.items()},
        "ablation_tasks_per_s": {k: round(v, 2) for k, v in speed.items() if k not in CONFIGS},
        "rounds": args.rounds,
        "malloc": malloc_mode(),
        "torch": torch.__version__,
    }
    if "strided-vmap-so" in speed:  # not timed with --quick
        strided, strided_loop = speed["strided-vmap-so"], speed["strided-loop-so"]
        result["strided_so_tasks_per_s"] = round(strided, 2)
        result["strided_loop_so_tasks_per_s"] = round(strided_loop, 2)
        result["strided_ratio_so"] = round(strided / strided_loop, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
