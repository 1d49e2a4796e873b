"""Multi-process meta-training on torch.distributed (torchrun, gloo backend).

Launched with ``torchrun --nproc-per-node N -m fewshot train ...``, every
process runs the same training loop on its share of the meta-batch: with
meta-batch T, rank r of N takes episodes ``k*T + r*T/N ...`` of step k, the
very episodes a single process would take as its r-th slice, so averaging
the ranks' meta-gradients gives the single-process meta-gradient over the
same T episodes. Rank 0 alone writes run directories, logs and checkpoints;
validation and evaluation episodes are split across ranks and gathered.

Outside torchrun (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``)
every function here is the identity, so the single-process path stays exactly
as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from fewshot.errors import FewShotError

T = TypeVar("T")


class DistributedError(FewShotError):
    """A torchrun launch that cannot work (bad meta-batch split, missing rendezvous settings)."""


def launched() -> bool:
    """True in a process that torchrun started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints results."""
    return rank() == 0


def init_from_env(threads: int | None = None) -> None:
    """Join the process group torchrun set up (idempotent; a no-op in a single process).

    Each rank gets ``threads`` intra-op threads, or an equal share of this
    machine's cores between the processes torchrun started on it.
    """
    if not launched() or active():
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: launch with "
            "torchrun (e.g. `torchrun --nproc-per-node 2 -m fewshot train ...`), which sets them."
        )
    _bind_world_defaults_early()
    # gloo: the engine trains on CPU tensors (nccl would need them on GPUs)
    dist.init_process_group("gloo", timeout=timedelta(minutes=30))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))


def _bind_world_defaults_early() -> None:
    """Import ``torch.distributed.nn.functional`` while no process group exists.

    Its ten functions take ``group=group.WORLD`` as a default argument, bound
    when the module is first imported; ``torch.optim`` imports it (through
    ``torch._dynamo``) when the first optimiser is built. Imported after
    ``init_process_group``, those defaults hold the group for good, so
    ``destroy_process_group`` cannot free it: its gloo threads then live into
    interpreter finalisation, and one that drops a finished collective there
    aborts the process ("terminate called without an active exception") after
    the command has done all its work. Imported first, the defaults are None.
    """
    import torch.distributed.nn.functional  # noqa: F401


def shutdown(finished: bool = True) -> None:
    """Leave the process group, which joins its gloo threads (see ``_bind_world_defaults_early``).
    After a finished command every rank waits for the others first, so none tears down gloo
    while a peer still writes its checkpoint. After an error there is no barrier, since the
    other ranks may never reach it; torchrun stops them."""
    if active():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def check_meta_batch(meta_batch: int) -> int:
    """Tasks per rank; the meta-batch must split evenly so every rank's gradient has equal weight."""
    n = world_size()
    if meta_batch % n:
        raise DistributedError(
            f"train.meta_batch={meta_batch} does not split evenly across {n} processes. Set "
            f"--set train.meta_batch={max(n, meta_batch - meta_batch % n)} (a multiple of {n}), or launch "
            f"with --nproc-per-node dividing {meta_batch}."
        )
    return meta_batch // n


def shard(count: int) -> range:
    """This rank's contiguous share of ``count`` items (ranks below ``count % N`` take one more)."""
    n, r = world_size(), rank()
    base, extra = divmod(count, n)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def gather_cat(values: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``values`` in rank order (the inverse of ``shard``)."""
    if not active():
        return values
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, values.cpu())
    return torch.cat(parts).to(values.device)


def mean_scalars(values: Sequence[float]) -> list[float]:
    """Average numbers across ranks (losses and metrics for the log)."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a signal that reached only some processes)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def average_gradients(module: nn.Module) -> None:
    """Replace each parameter's gradient by its mean over ranks, in one flat all-reduce."""
    if not active():
        return
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) so every rank holds the same model."""
    if not active():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def broadcast_module(module: nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not active():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (run directory names, loaded checkpoints)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 of each machine runs the block first (building a data cache), then the others."""
    local_rank = int(os.environ.get("LOCAL_RANK", rank()))
    if active() and local_rank != 0:
        dist.barrier()
    yield
    if active() and local_rank == 0:
        dist.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result, or the FewShotError it raised, to every rank.

    For reading files that only rank 0 is sure to see (a run directory on
    rank 0's machine), without leaving the other ranks waiting forever when
    it fails.
    """
    if not active():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            outcome = (True, fn())
        except FewShotError as exc:
            outcome = (False, exc)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value
