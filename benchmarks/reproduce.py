"""Reproduce one row of docs/results.md: train a preset, meta-test it, print the row.

    python benchmarks/reproduce.py maml omniglot-5w1s            # the full preset
    python benchmarks/reproduce.py maml omniglot-5w1s --steps 7000 --keep-every 500 --curve

trains ``<method>-<setting>`` (``fewshot presets`` lists them) into
``runs/reproduce/<preset>`` (resuming it if it was stopped; refusing a run
trained past ``--steps``), evaluates the checkpoint selected on validation
episodes on ``--episodes`` fixed test episodes (the preset's evaluation
seed, so a rerun meets the same tasks), and prints the row beside the
published figure; a row tested on other data, image size, ways, shots or
test split than the preset's is recorded as not comparable with it. For
Omniglot and image presets only (sinusoid regression: ``benchmarks/sinusoid.py``).
``--steps`` cuts (or extends) the schedule and the row says so. A step-wise
learning-rate schedule (constant, or ``step``: x gamma every step_size) is
unchanged, so the cut run is the full run's prefix; a schedule defined by the run's length (``linear`` to 0,
``cosine``) is fitted to the cut length, so the cut run still anneals.

``--curve`` meta-tests every checkpoint kept by ``--keep-every`` on
``--curve-episodes`` test episodes and plots test accuracy against training
wall time (the engine's clock counts training steps only: no validation,
checkpointing or evaluation), tested on the row's own episodes and written
to the row's folder ``<runs>/<preset>`` (``curve.json``,
``time_to_accuracy.png``) and, with
``--plot``, to a path of your choice (``benchmarks/plot_curves.py`` redraws
recorded rows' curves, several on one figure). Needs FEWSHOT_DATA (or a download).

``--trained-by PRESET`` tests the model trained by another preset whose
training is identical (same seed, data, method, episodes and schedule; only
the test settings differ), e.g. ``protonet omniglot-20w1s --trained-by
protonet-omniglot-5w1s``: Snell et al. train one 60-way model and test it
at 5 and 20 ways, and so do our presets. It trains that preset's run if
needed and tests the checkpoint that run selected on *its own* validation
episodes; the row records both presets.

The last line is one JSON object of the row's figures.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from plot_curves import parse_target, plot_curve, series_label

from fewshot.allocator import malloc_mode, tune_malloc
from fewshot.config import Config, load_config, to_yaml, training_differences
from fewshot.data.datasets import VINYALS_SPLITS
from fewshot.engine import checkpoint
from fewshot.engine.runs import evaluate_run, load_run
from fewshot.engine.train import Interrupted, RunMismatch, train
from fewshot.errors import FewShotError


def cpu_model() -> str:
    """The processor's name (Linux: /proc/cpuinfo).

    A VM can move to another host CPU between runs; that changes the speed
    and the floating-point kernels, so a rerun there trains other weights.
    """
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    threads = torch.get_num_threads()
    return (
        f"{threads} thread{'s' * (threads != 1)}, {cpu_model()} ({platform.machine()}), "
        f"torch {torch.__version__}, malloc {malloc_mode()}"
    )


def split_label(dataset: str, split: str) -> str:
    """Which classes a row was tested on, in words."""
    if split.endswith(".txt"):
        return f"{dataset} classes listed in {split}"
    if dataset == "omniglot" and split in VINYALS_SPLITS:
        return f"omniglot {split} (Vinyals), rotations as classes"
    return f"{dataset} {split}"


def at_least_one(text: str) -> int:
    """An argparse type: a count of steps or episodes, which 0 or less would silently ignore."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_steps(text: str) -> set[int]:
    """'500,1000' -> {500, 1000}: parsed with the arguments, not after hours of training."""
    try:
        steps = {int(v) for v in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected steps separated by commas, e.g. 500,1000; got {text!r}"
        ) from None
    if min(steps) < 1:
        raise argparse.ArgumentTypeError(f"steps are at least 1; got {text!r}")
    return steps


def kept_steps(run_dir: Path) -> dict[int, Path]:
    """The run's kept checkpoints (``--keep-every``) by step."""
    return {int(p.stem.split("-")[1]): p for p in (run_dir / "checkpoints").glob("step-*.pt")}


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN (a 1-episode test has no confidence interval): write null instead."""
    return value if math.isfinite(value) else None


def curve(checkpoints: dict[int, Path], episodes: int, config: Config) -> list[dict[str, float | None]]:
    """Test accuracy of ``checkpoints`` against training wall time.

    Tested with ``config``'s episodes (ways, shots, queries, seed) as the row's own test is,
    not with the config each checkpoint was trained by (``--trained-by`` trains other ways).
    """
    points: list[dict[str, float | None]] = []
    for step in sorted(checkpoints):
        state = checkpoint.load(checkpoints[step])
        result = evaluate_run(
            load_run(checkpoints[step]),
            episodes=episodes,
            ways=config.eval_ways,
            shots=config.eval_shots,
            queries=config.eval.queries,
            seed=config.eval.seed,
        )
        points.append(
            {
                "step": int(state["step"]),
                "train_s": round(float(state["elapsed"]), 1),
                "accuracy": result.accuracy,
                "ci95": finite_or_none(result.ci95),
            }
        )
        ci = "n/a" if points[-1]["ci95"] is None else f"{100 * result.ci95:.2f}%"
        print(
            f"  step {int(state['step']):6d}  {float(state['elapsed']) / 60:6.1f} min  "
            f"{100 * result.accuracy:.2f}% ± {ci}",
            flush=True,
        )
    return points


def incomparable(config: Config, full: Config) -> list[str]:
    """How the row's test differs from the preset's, which the published figure was measured on."""
    settings = {
        "data.dataset": (config.data.dataset, full.data.dataset),
        "data.image_size": (config.data.image_size, full.data.image_size),
        "eval ways": (config.eval_ways, full.eval_ways),
        "eval shots": (config.eval_shots, full.eval_shots),
        "data.test_split": (config.data.test_split, full.data.test_split),
    }
    return [
        f"{key} {mine!r} (preset {theirs!r})" for key, (mine, theirs) in settings.items() if mine != theirs
    ]


TRAINED_ON = "reproduce.json"
"""In the run directory: the machine and command wall time of the invocation that trained it, so a
rerun that only tests reports those, not its own machine and a 0-minute wall time."""


def training_record(run_dir: Path, row_file: Path, steps: int) -> dict[str, object] | None:
    """The machine and command wall time recorded when ``run_dir`` was trained, if known."""
    for path in (run_dir / TRAINED_ON, row_file):
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("steps") == steps and "machine" in record:
                return {"machine": record["machine"], "command_wall_min": record.get("command_wall_min")}
    return None


def describe_steps(steps: set[int]) -> str:
    """'500,1000,...,5000' for a long list of kept steps; 'none' for none."""
    ordered = sorted(steps)
    if len(ordered) > 6:
        ordered = [*ordered[:3], "...", *ordered[-2:]]
    return ",".join(map(str, ordered)) or "none"


def main() -> None:
    tune_malloc()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", help="maml, fomaml, reptile, metasgd, anil, protonet, matching, relation")
    parser.add_argument("setting", help="e.g. omniglot-5w1s, omniglot-20w5s")
    parser.add_argument("--steps", type=at_least_one, help="train N steps instead of the preset's")
    parser.add_argument("--episodes", type=at_least_one, default=1000, help="test episodes (default 1000)")
    parser.add_argument(
        "--keep-every", type=at_least_one, help="keep a checkpoint every N steps (for --curve)"
    )
    parser.add_argument("--curve", action="store_true", help="test every kept checkpoint; plot")
    parser.add_argument("--curve-episodes", type=at_least_one, default=600)
    parser.add_argument(
        "--curve-steps", type=parse_steps, help="kept checkpoints to test, e.g. 500,1000 (default all)"
    )
    parser.add_argument(
        "--target", type=parse_target, action="append", default=[], metavar="MIN:ACC", help="mark on the plot"
    )
    parser.add_argument("--plot", type=Path, help="also write the time-to-accuracy plot here")
    parser.add_argument("--runs", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--trained-by", metavar="PRESET", help="test the run of this identically trained preset"
    )
    args = parser.parse_args()

    if args.curve_steps and not args.curve:
        parser.error("--curve-steps chooses the checkpoints --curve tests: add --curve")

    preset = f"{args.method}-{args.setting}"
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.keep_every is not None:
        overrides.append(f"train.keep_every={args.keep_every}")
    trained_by = args.trained_by or preset
    try:  # a mistyped preset or --set is the user's to fix: one line, no traceback
        full = load_config(preset)
        config = load_config(preset, overrides)
        train_config = load_config(trained_by, overrides) if args.trained_by else config
    except FewShotError as error:
        sys.exit(f"error: {error}")
    for name, cfg in {preset: config, trained_by: train_config}.items():
        if cfg.task != "classification":
            sys.exit(
                f"error: {name} is a {cfg.task} preset; reproduce.py reproduces the results table's "
                f"image-classification rows (accuracy over N-way episodes). For {cfg.task} use "
                f"benchmarks/sinusoid.py."
            )
    if args.trained_by:
        different = training_differences(config, train_config)
        if different:
            sys.exit(
                f"--trained-by {trained_by}: it does not train like {preset} ("
                + "; ".join(
                    f"{key}: {mine!r} in {preset}, {theirs!r} in {trained_by}"
                    for key, mine, theirs in different
                )
                + f"); run {preset} on its own instead"
            )
    run_dir = args.runs / trained_by
    row_dir = args.runs / preset
    if args.curve:  # known before training: a curve of no checkpoint is refused now, not after hours
        kept = set(kept_steps(run_dir))
        every, last = train_config.train.keep_every, train_config.train.steps
        will_keep = kept | (set(range(every, last + 1, every)) if every else set())
        asked = args.curve_steps if args.curve_steps else will_keep
        missing = sorted(asked - will_keep)
        if not will_keep:
            sys.exit(
                f"error: --curve tests the checkpoints kept by --keep-every; {run_dir} keeps none: "
                "add --keep-every N"
            )
        if missing:
            sys.exit(
                f"error: --curve-steps {','.join(map(str, missing))}: no checkpoint is kept there "
                f"(kept{' or to be kept' if every else ''}: steps {describe_steps(will_keep)}); "
                "choose among those or change --keep-every"
            )
    started = time.perf_counter()
    try:  # a complete run trains nothing; one that other settings trained is refused
        result = train(train_config, run_dir, resume=(run_dir / "checkpoints" / "last.pt").is_file())
    except Interrupted as stopped:
        sys.exit(f"{stopped}\nOr rerun this same command: it resumes the run where it stopped.")
    except RunMismatch as error:  # e.g. a preset changed since the run: its checkpoints are not this row's
        sys.exit(f"error: {error} With reproduce.py: add --runs OTHER_FOLDER.")
    except FewShotError as error:
        sys.exit(f"error: {error}")
    if result.resumed_from == result.steps:
        print(f"{run_dir} is already trained to {result.steps} steps", flush=True)
    else:
        print(
            f"trained {trained_by}: {result.steps} steps, {result.wall_time_s:.0f} s of training", flush=True
        )
    wall_min = round((time.perf_counter() - started) / 60, 1)
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    trained_now = result.resumed_from != result.steps
    if trained_now:
        record = {"steps": int(state["step"]), "machine": machine(), "command_wall_min": wall_min}
        (run_dir / TRAINED_ON).write_text(json.dumps(record, indent=1) + "\n")
    else:  # only testing now: the row keeps the machine and time of the invocation that trained
        record = training_record(run_dir, row_dir / "row.json", int(state["step"])) or {
            "machine": machine(),
            "command_wall_min": wall_min,
        }
    checkpoints: dict[int, Path] = {}
    if args.curve:  # checked again now that training is done, before the test's minutes
        checkpoints = kept_steps(run_dir)
        if args.curve_steps:
            checkpoints = {step: path for step, path in checkpoints.items() if step in args.curve_steps}
        missing = sorted(set(args.curve_steps or ()) - set(checkpoints))
        if missing or not checkpoints:
            sys.exit(
                f"error: --curve: {run_dir} has no kept checkpoint at step(s) "
                f"{','.join(map(str, missing)) or '(any)'}; kept: {describe_steps(set(kept_steps(run_dir)))}"
            )
    outcome = evaluate_run(
        load_run(run_dir),
        episodes=args.episodes,
        ways=config.eval_ways,
        shots=config.eval_shots,
        queries=config.eval.queries,
        seed=config.eval.seed,
    )
    print(f"test {outcome.line()}")
    published = full.published
    row: dict[str, object] = {
        "preset": preset,
        "accuracy": round(100 * outcome.accuracy, 2),
        "ci95": None if finite_or_none(outcome.ci95) is None else round(100 * outcome.ci95, 2),
        "published": published.accuracy,
        "published_ci95": published.ci95,
        "source": published.source,
        "episodes": outcome.episodes,
        "ways": outcome.ways,
        "shots": outcome.shots,
        "split": split_label(outcome.dataset, outcome.split),
        "batchnorm": outcome.batchnorm,
        "steps": int(state["step"]),
        "preset_steps": full.train.steps,
        "schedule_cut": config.train.steps < full.train.steps,
        "train_min": round(float(state["elapsed"]) / 60, 1),
        "command_wall_min": record["command_wall_min"],
        "seed": config.seed,
        "eval_seed": config.eval.seed,
        "overrides": overrides,
        "machine": record["machine"],
    }
    if args.trained_by:
        row["trained_by"] = trained_by
    differences = incomparable(config, full)
    if published.accuracy is not None and not differences:
        low = 100 * (outcome.accuracy + (finite_or_none(outcome.ci95) or 0.0))
        row["meets_published"] = bool(low >= published.accuracy)
    elif published.accuracy is not None:  # a test on other data or episodes says nothing about the paper's
        row["meets_published"] = None
        row["not_comparable"] = "; ".join(differences)
    row_dir.mkdir(parents=True, exist_ok=True)
    if args.curve:
        print(f"time to accuracy ({args.curve_episodes} test episodes per point):", flush=True)
        points = curve(checkpoints, args.curve_episodes, config)
        row["curve"] = points
        (row_dir / "curve.json").write_text(json.dumps(points, indent=1) + "\n")
        series = [(series_label(row), points)]
        ylabel = f"{outcome.ways}-way {outcome.shots}-shot test accuracy (%)"
        for out in [row_dir / "time_to_accuracy.png", *([args.plot] if args.plot else [])]:
            plot_curve(series, f"{preset} ({outcome.batchnorm} BatchNorm)", args.target, out, ylabel)
    if args.trained_by:  # the run directory belongs to the training preset; record this row's config
        (row_dir / "config.yaml").write_text(to_yaml(config))
    (row_dir / "row.json").write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    sys.exit(main())
