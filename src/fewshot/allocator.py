"""Keep freed memory in the process: glibc malloc settings for training on CPU.

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above
its mmap threshold (at most 32 MB, adjusted on the fly) with a fresh
``mmap`` and gives it back with ``munmap`` when the tensor dies, and trims
the heap when its free top grows past the trim threshold. A training step
allocates and frees the same large activations and gradients every time, so
each step faults every page of them in again: a Prototypical Networks
episode on Conv-4 (360 Omniglot images) takes 65,000 to 93,000 page faults
per step and about 40% of its time goes to them (``benchmarks/protonet_speed.py``
measures it). Raising both thresholds keeps freed blocks for reuse: no
faults after the first steps, for a peak resident size 15 to 30% higher
(907 against 785 MB, 911 against 702, in two runs there), which then stays
allocated until the process ends.

glibc reads these settings (``GLIBC_TUNABLES``) only when a process starts;
setting them with ``mallopt`` from the running process measured no better,
at times worse. So the ``fewshot`` command and the benchmark scripts call
``tune_malloc()`` first thing: if the settings are missing it re-executes
the same command line once with them added. Set
``FEWSHOT_MALLOC=system`` to keep the system's behaviour. Nothing happens
off Linux, with another C library, or when ``GLIBC_TUNABLES`` already sets
either threshold.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

THRESHOLD = 1 << 30
"""1 GiB: larger than any single block a few-shot training step allocates."""

TUNABLES = f"glibc.malloc.mmap_threshold={THRESHOLD}:glibc.malloc.trim_threshold={THRESHOLD}"
OPT_OUT = "FEWSHOT_MALLOC"
MARKER = "FEWSHOT_MALLOC_TUNED"
"""Set in the re-executed process, so that it never re-executes again."""


def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _sets_thresholds(tunables: str) -> bool:
    return "malloc.mmap_threshold" in tunables or "malloc.trim_threshold" in tunables


def tuned_environment(environ: Mapping[str, str], glibc: bool | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing is to be done."""
    if glibc is None:
        glibc = _glibc()
    if not glibc or environ.get(MARKER) or environ.get(OPT_OUT, "").lower() == "system":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if _sets_thresholds(current):
        return None  # the user chose; leave it
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLES}" if current else TUNABLES
    env[MARKER] = "1"
    return env


def malloc_mode(environ: Mapping[str, str] | None = None) -> str:
    """How this process's malloc was set up, for run records: ``tuned``, ``user`` or ``system``."""
    environ = os.environ if environ is None else environ
    if environ.get(MARKER) and TUNABLES in environ.get("GLIBC_TUNABLES", ""):
        return "tuned"
    return "user" if _sets_thresholds(environ.get("GLIBC_TUNABLES", "")) else "system"


def tune_malloc() -> None:
    """Re-execute this command with the malloc settings above, once; returns if not needed.

    Call it first in a program's entry point, before any output or side
    effect: the process image is replaced (same PID, arguments, environment
    plus ``GLIBC_TUNABLES``), so whatever ran before runs again. Does nothing
    in an interactive session or a notebook kernel, which a re-execution
    would restart.
    """
    if hasattr(sys, "ps1") or sys.flags.interactive or "ipykernel" in sys.modules:
        return
    env = tuned_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
