"""Checkpoints that are never half-written and never execute code when loaded.

A checkpoint is one ``torch.save`` file of tensors, numbers and strings only:
the method's weights, the optimiser and scheduler state, the step, torch's RNG
state and the resolved config as YAML text. It is written to a temporary file
in the same folder (with the mode the umask gives any new file, as config.yaml
has) and renamed into place, so a crash leaves the previous checkpoint
intact; it is read with ``weights_only=True``, which refuses any
pickled object other than tensors and plain containers.
"""

from __future__ import annotations

import os
import pickle
import secrets
import zipfile
from pathlib import Path
from typing import Any

import torch

from fewshot.errors import FewShotError

FORMAT = 1


class CheckpointError(FewShotError):
    """A checkpoint that is missing, truncated, or not fewshot's."""


def save_atomic(state: dict[str, Any], path: Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # not mkstemp, whose files are private (0600): a checkpoint is as readable as the rest of the run
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely; raises CheckpointError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"Checkpoint {path} is truncated, corrupt or not a fewshot checkpoint ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Use another checkpoint of the run, or retrain."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "config" not in state:
        raise CheckpointError(f"{path} is not a fewshot checkpoint (format {FORMAT}).")
    return state
