"""Loading a trained method back from a run directory or a checkpoint file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewshot.config import Config, from_yaml
from fewshot.engine import checkpoint, distributed
from fewshot.engine.checkpoint import CheckpointError
from fewshot.engine.evaluate import EvalResult, evaluate, mean_ci95
from fewshot.engine.setup import load_split
from fewshot.errors import FewShotError
from fewshot.methods.base import Method
from fewshot.methods.registry import GRADIENT as HEAD_METHODS
from fewshot.methods.registry import build_method
from fewshot.tasks.sinusoid import SinusoidTasks


@dataclass
class LoadedRun:
    config: Config
    method: Method
    preprocess: dict[str, Any]
    path: Path
    step: int


def resolve(path: str | Path) -> Path:
    """A run directory means its best checkpoint (else its last); a file is taken as is."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"{path} holds no checkpoints/best.pt or checkpoints/last.pt: is it a run directory?"
        )
    return path


def _read(path: str | Path) -> tuple[Path, dict]:
    file = resolve(path)
    return file, checkpoint.load(file)


def load_run(path: str | Path, expect_method: str | None = None) -> LoadedRun:
    """Rebuild the method of a checkpoint and load its weights (no pickled code is executed)."""
    # under torchrun the run directory is on rank 0's machine: it reads, every rank receives
    file, state = distributed.on_main(lambda: _read(path))
    config = from_yaml(state["config"], where=f"in checkpoint {file}")
    if expect_method is not None and state["method_name"] != expect_method:
        raise CheckpointError(f"{file} is a {state['method_name']} checkpoint, not {expect_method}.")
    preprocess = dict(state.get("preprocess") or {})
    if config.task == "sinusoid":
        shape: tuple[int, ...] = (1,)
    else:
        shape = (int(preprocess["channels"]), int(preprocess["image_size"]), int(preprocess["image_size"]))
    method = build_method(config, shape)
    try:
        method.load_state_dict(state["method"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(
            f"The weights in {file} do not fit a {config.method.name} model built from its own config "
            f"({str(exc).splitlines()[0]}); the checkpoint is from another method or version."
        ) from None
    method.eval()
    return LoadedRun(config, method, preprocess, file, int(state["step"]))


def evaluate_run(
    run: LoadedRun,
    split: str | None = None,
    episodes: int | None = None,
    ways: int | None = None,
    shots: int | None = None,
    queries: int | None = None,
    seed: int | None = None,
    data_root: str | None = None,
) -> EvalResult:
    """Meta-test a loaded run on fixed episodes; unset arguments come from the run's config."""
    config = run.config
    e = config.eval
    episodes = episodes or e.episodes
    seed = e.seed if seed is None else seed
    if config.task == "sinusoid":
        return _evaluate_sinusoid(
            run, episodes, shots or config.train_episode.shots, queries or e.queries, seed
        )
    if data_root is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"data_root": data_root})})
    ways = ways or config.eval_ways
    if config.method.name in HEAD_METHODS and ways != config.train_episode.ways:
        raise FewShotError(
            f"This {config.method.name} model has a {config.train_episode.ways}-way output layer; it cannot "
            f"be evaluated on {ways}-way tasks. Use --ways {config.train_episode.ways}."
        )
    dataset = load_split(config, split or config.data.test_split)
    return evaluate(
        run.method, dataset, ways, shots or config.eval_shots, queries or e.queries, episodes, seed, e.chunk
    )


def _evaluate_sinusoid(run: LoadedRun, episodes: int, shots: int, queries: int, seed: int) -> EvalResult:
    """Mean squared error after adaptation on ``episodes`` fixed sinusoid tasks."""
    tasks = SinusoidTasks(shots, queries, tasks=min(episodes, 100), seed=seed)
    errors = []
    run.method.eval()
    for i in range(math.ceil(episodes / tasks.tasks)):
        batch = tasks[i]
        with torch.no_grad():
            pred = run.method.query_logits(batch)
        errors.append(((pred - batch.query_labels) ** 2).mean(dim=(1, 2)))
    mse, ci = mean_ci95(torch.cat(errors)[:episodes])
    info = run.method.describe()
    return EvalResult(
        mse,
        ci,
        episodes,
        0,
        shots,
        queries,
        "test",
        "sinusoid",
        seed,
        str(info.get("method")),
        str(info.get("batchnorm", "n/a")),
        info,
        metric="mse",
    )
