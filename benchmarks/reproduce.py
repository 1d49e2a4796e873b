"""Reproduce one row of docs/results.md: train a preset, meta-test it, print the row.

    python benchmarks/reproduce.py maml omniglot-5w1s            # the full preset
    python benchmarks/reproduce.py maml omniglot-5w1s --steps 7000 --keep-every 500 --curve

trains ``<method>-<setting>`` (``fewshot presets`` lists them) into
``runs/reproduce/<preset>`` (resuming it if it was stopped; refusing a run
trained past ``--steps``), evaluates the checkpoint selected on validation
episodes on ``--episodes`` fixed test episodes (the preset's evaluation
seed, so a rerun meets the same tasks), and prints the row beside the
published figure. ``--steps`` cuts the schedule
and the row says so. A step-wise learning-rate schedule (constant, or
``step``: x gamma every step_size) is unchanged, so the cut run is the full
run's prefix; a schedule defined by the run's length (``linear`` to 0,
``cosine``) is fitted to the cut length, so the cut run still anneals.

``--curve`` meta-tests every checkpoint kept by ``--keep-every`` on
``--curve-episodes`` test episodes and plots test accuracy against training
wall time (the engine's clock counts training steps only: no validation,
checkpointing or evaluation), written to the run directory and, with
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
import platform
import sys
import time
from pathlib import Path

import torch
from plot_curves import parse_target, plot_curve, series_label

from fewshot.allocator import malloc_mode, tune_malloc
from fewshot.config import load_config, to_yaml, training_differences
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


def curve(run_dir: Path, episodes: int, steps: set[int] | None) -> list[dict[str, float]]:
    """Test accuracy of the kept checkpoints (those at ``steps``, or all), against training wall time."""
    points = []
    for path in sorted((run_dir / "checkpoints").glob("step-*.pt")):
        if steps is not None and int(path.stem.split("-")[1]) not in steps:
            continue
        state = checkpoint.load(path)
        result = evaluate_run(load_run(path), episodes=episodes)
        points.append(
            {
                "step": int(state["step"]),
                "train_s": round(float(state["elapsed"]), 1),
                "accuracy": result.accuracy,
                "ci95": result.ci95,
            }
        )
        print(
            f"  step {points[-1]['step']:6d}  {points[-1]['train_s'] / 60:6.1f} min  "
            f"{100 * result.accuracy:.2f}% ± {100 * result.ci95:.2f}%",
            flush=True,
        )
    return points


def main() -> None:
    tune_malloc()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", help="maml, fomaml, reptile, metasgd, anil, protonet, matching, relation")
    parser.add_argument("setting", help="e.g. omniglot-5w1s, omniglot-20w5s")
    parser.add_argument("--steps", type=int, help="cut the schedule to its first N steps")
    parser.add_argument("--episodes", type=int, default=1000, help="test episodes (default 1000)")
    parser.add_argument("--keep-every", type=int, help="keep a checkpoint every N steps (for --curve)")
    parser.add_argument("--curve", action="store_true", help="test every kept checkpoint; plot")
    parser.add_argument("--curve-episodes", type=int, default=600)
    parser.add_argument("--curve-steps", help="kept checkpoints to test, e.g. 500,1000 (default all)")
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

    preset = f"{args.method}-{args.setting}"
    overrides = list(args.overrides)
    full = load_config(preset)
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    if args.keep_every:
        overrides.append(f"train.keep_every={args.keep_every}")
    config = load_config(preset, overrides)
    trained_by = args.trained_by or preset
    train_config = load_config(trained_by, overrides) if args.trained_by else config
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
    wall = time.perf_counter() - started
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    outcome = evaluate_run(
        load_run(run_dir),
        episodes=args.episodes,
        ways=config.eval_ways if config.task == "classification" else None,  # sinusoid tasks have no ways
        shots=config.eval_shots,
        queries=config.eval.queries,
        seed=config.eval.seed,
    )
    print(f"test {outcome.line()}")
    published = full.published
    row: dict[str, object] = {
        "preset": preset,
        "accuracy": round(100 * outcome.accuracy, 2),
        "ci95": round(100 * outcome.ci95, 2),
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
        "command_wall_min": round(wall / 60, 1),
        "seed": config.seed,
        "eval_seed": config.eval.seed,
        "overrides": overrides,
        "machine": machine(),
    }
    if args.trained_by:
        row["trained_by"] = trained_by
    if published.accuracy is not None and config.data.test_split == full.data.test_split:
        low = 100 * (outcome.accuracy + outcome.ci95)
        row["meets_published"] = bool(low >= published.accuracy)
    elif published.accuracy is not None:  # another split's figure says nothing about the paper's
        row["published_split"] = full.data.test_split
    if args.curve:
        print(f"time to accuracy ({args.curve_episodes} test episodes per point):", flush=True)
        wanted = {int(v) for v in args.curve_steps.split(",")} if args.curve_steps else None
        points = curve(run_dir, args.curve_episodes, wanted)
        row["curve"] = points
        (run_dir / "curve.json").write_text(json.dumps(points, indent=1) + "\n")
        series = [(series_label(row), points)]
        for out in [run_dir / "time_to_accuracy.png", *([args.plot] if args.plot else [])]:
            plot_curve(series, f"{preset} ({outcome.batchnorm} BatchNorm)", args.target, out)
    row_dir = args.runs / preset
    row_dir.mkdir(parents=True, exist_ok=True)
    if args.trained_by:  # the run directory belongs to the training preset; record this row's config
        (row_dir / "config.yaml").write_text(to_yaml(config))
    (row_dir / "row.json").write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    sys.exit(main())
