"""Loading a trained method back from a run directory or a checkpoint file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewshot.config import Config, from_yaml
from fewshot.engine import checkpoint, distributed
from fewshot.engine.checkpoint import CheckpointError
from fewshot.engine.evaluate import EvalResult, evaluate, mean_ci95, regression_errors
from fewshot.engine.setup import load_split
from fewshot.errors import FewShotError
from fewshot.methods.base import Method
from fewshot.methods.registry import GRADIENT as HEAD_METHODS
from fewshot.methods.registry import build_method
from fewshot.tasks.sinusoid import SinusoidTasks

RETRAIN = "use another checkpoint of the run, or retrain"

REQUIRED = ("method_name", "method", "step")
"""Keys every checkpoint written by training holds besides its config (image runs also need preprocess)."""


@dataclass
class LoadedRun:
    """A checkpoint's method, ready to use.

    ``preprocess`` holds the checkpoint's decoding settings plus two facts from its
    config that prediction needs to refuse inputs the model cannot take: ``task``
    and ``head_ways`` (see ``head_ways``).
    """

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


def head_ways(config: Config) -> int | None:
    """Classes a fixed-size output layer was trained for (gradient methods on images), else None."""
    if config.task == "sinusoid" or config.method.name not in HEAD_METHODS:
        return None
    return config.train_episode.ways


def check_ways(method: str, fixed: int | None, ways: int, found: str, fix: str) -> None:
    """Refuse ``ways`` classes for a model whose output layer scores exactly ``fixed`` (None: any number).

    Without this the inner loop indexes past the head (IndexError) or the outputs
    and class names do not pair up; ``found`` says where the count came from.
    """
    if fixed is not None and ways != fixed:
        raise FewShotError(
            f"This {method} checkpoint was trained for {fixed}-way tasks (its output layer has {fixed} "
            f"outputs), so it cannot handle {found}; {fix}."
        )


def _config(state: dict, file: Path) -> Config:
    """The checkpoint's config, with a CheckpointError for text that is no config at all."""
    try:
        return from_yaml(state["config"], where=f"in checkpoint {file}")
    except (FewShotError, ValueError, TypeError) as exc:  # a bad setting's message names the key itself
        raise CheckpointError(
            f"{str(exc).splitlines()[0]} The file is damaged or not written by fewshot; {RETRAIN}."
        ) from None


def _check_state(state: dict, config: Config, file: Path) -> dict[str, Any]:
    """Refuse a checkpoint that lacks what a run needs; returns its preprocess settings."""
    missing = [key for key in REQUIRED if key not in state]
    preprocess = state.get("preprocess")
    if config.task != "sinusoid" and not (
        isinstance(preprocess, dict) and {"channels", "image_size"} <= preprocess.keys()
    ):
        missing.append("preprocess (image size and channels)")
    if missing:
        raise CheckpointError(
            f"Checkpoint {file} lacks {', '.join(missing)}, so it was not written by fewshot train or is "
            f"damaged; {RETRAIN}."
        )
    return dict(preprocess or {})


def load_run(path: str | Path, expect_method: str | None = None) -> LoadedRun:
    """Rebuild the method of a checkpoint and load its weights (no pickled code is executed)."""
    # under torchrun the run directory is on rank 0's machine: it reads, every rank receives
    file, state = distributed.on_main(lambda: _read(path))
    config = _config(state, file)
    preprocess = _check_state(state, config, file)
    if expect_method is not None and state["method_name"] != expect_method:
        raise CheckpointError(f"{file} is a {state['method_name']} checkpoint, not {expect_method}.")
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
    if state["method_name"] != config.method.name:  # after the weights: a misfit is the sharper diagnosis
        raise CheckpointError(
            f"Checkpoint {file} is labelled a {state['method_name']} checkpoint but its config describes "
            f"{config.method.name}, so one of them was altered; {RETRAIN}."
        )
    method.eval()
    preprocess.update(task=config.task, head_ways=head_ways(config))
    return LoadedRun(config, method, preprocess, file, int(state["step"]))


def _at_least(value: int | None, flag: str, least: int = 1) -> None:
    """Refuse a count below ``least``: 0 must not fall back to the default nor a negative run."""
    if value is not None and value < least:
        raise FewShotError(
            f"{flag} must be at least {least}, got {value}; give {least} or more, or leave it out to use "
            "the run's config."
        )


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
    """Meta-test a loaded run on fixed episodes; unset (None) arguments come from the run's config."""
    config = run.config
    e = config.eval
    counts = {"--episodes": episodes, "--ways": ways, "--shots": shots, "--queries": queries}
    for flag, value in counts.items():
        _at_least(value, flag)
    _at_least(seed, "--seed", least=0)
    episodes = e.episodes if episodes is None else episodes
    seed = e.seed if seed is None else seed
    shots = config.eval_shots if shots is None else shots
    queries = e.queries if queries is None else queries
    if config.task == "sinusoid":
        for value, flag in ((ways, "--ways"), (split, "--split")):
            if value is not None:
                raise FewShotError(
                    f"{flag} does not apply to this sinusoid-regression run (its tasks are drawn, not taken "
                    f"from a dataset split, and have no classes); leave {flag} out."
                )
        return _evaluate_sinusoid(run, episodes, shots, queries, seed)
    if data_root is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"data_root": data_root})})
    ways = config.eval_ways if ways is None else ways
    fixed = head_ways(config)
    check_ways(config.method.name, fixed, ways, f"{ways}-way tasks", f"use --ways {fixed}")
    dataset = load_split(config, split or config.data.test_split)
    return evaluate(run.method, dataset, ways, shots, queries, episodes, seed, e.chunk)


def _evaluate_sinusoid(run: LoadedRun, episodes: int, shots: int, queries: int, seed: int) -> EvalResult:
    """Mean squared error after adaptation on ``episodes`` fixed sinusoid tasks."""
    tasks = SinusoidTasks(shots, queries, tasks=min(episodes, 100), seed=seed)
    mse, ci = mean_ci95(regression_errors(run.method, tasks, episodes))
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
