"""The ``fewshot`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from fewshot import __version__
from fewshot.allocator import tune_malloc
from fewshot.errors import FewShotError


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="folder holding the datasets (default: $FEWSHOT_DATA)")
    p.add_argument(
        "--image-size", type=int, help="side of the square images (default: 28 Omniglot, 84 others)"
    )
    p.add_argument(
        "--no-download",
        dest="download",
        action="store_false",
        help="never download; fail if the data is not on disk",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewshot", description="Meta-learning for few-shot recognition.")
    parser.add_argument("--version", action="version", version=f"fewshot {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    datasets = commands.add_parser("datasets", help="list, prepare, verify or show datasets")
    actions = datasets.add_subparsers(dest="action", required=True)
    p = actions.add_parser("list", help="the datasets fewshot knows and where it looks for them")
    p.add_argument("--data-root")
    for action, text in (
        ("prepare", "decode and cache every split"),
        ("verify", "check the dataset's integrity"),
    ):
        p = actions.add_parser(action, help=text)
        p.add_argument("name", help="omniglot, miniimagenet or folder:DIR")
        _data_options(p)
    p = actions.add_parser("show", help="render one episode to a PNG")
    p.add_argument("name")
    p.add_argument("--split")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="episode.png", help="PNG file to write (default: episode.png)")
    _data_options(p)

    p = commands.add_parser("presets", help="list the named presets of published settings")

    p = commands.add_parser("train", help="meta-train a preset or a YAML config, then evaluate it")
    p.add_argument("config", nargs="?", help="preset name (see `fewshot presets`) or path to a .yaml config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set train.steps=2000 (repeatable)",
    )
    p.add_argument("--run-dir", help="where the run is written (default: runs/<config name>)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint"
    )
    p.add_argument(
        "--no-eval", dest="evaluate", action="store_false", help="skip the test-set evaluation after training"
    )
    p.add_argument("--data-root", help="folder holding the datasets (default: $FEWSHOT_DATA)")

    p = commands.add_parser("eval", help="accuracy with a 95%% CI on fixed test episodes")
    p.add_argument("checkpoint", help="a run directory (uses its best checkpoint) or a .pt file")
    p.add_argument("--episodes", type=int)
    p.add_argument("--ways", type=int)
    p.add_argument("--shots", type=int)
    p.add_argument("--queries", type=int)
    p.add_argument("--split", help="dataset split to evaluate on (default: the config's test split)")
    p.add_argument("--seed", type=int, help="seed of the fixed episodes (default: the config's eval.seed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--data-root", help="folder holding the datasets (default: $FEWSHOT_DATA)")

    p = commands.add_parser("predict", help="label query images from a folder of labelled examples")
    p.add_argument("checkpoint", help="a run directory or a .pt file")
    p.add_argument("--support", required=True, help="folder of class folders of example images")
    p.add_argument("--query", required=True, nargs="+", help="query image files or folders")
    p.add_argument("--json", action="store_true", help="one JSON record per query image")
    return parser


def _presets() -> None:
    from fewshot.config import load_config, preset_names

    rows = []
    for name in preset_names():
        c = load_config(name)
        pub = c.published
        figure = (
            f"{pub.accuracy:.2f}%"
            if pub.accuracy is not None
            else f"MSE {pub.mse}"
            if pub.mse is not None
            else "-"
        )
        rows.append((name, c.method.name, f"{c.train.steps}", figure, pub.source))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("preset", "method", "steps", "published")
    print(
        f"{header[0]:{widths[0]}}  {header[1]:{widths[1]}}  {header[2]:>{widths[2]}}  "
        f"{header[3]:>{widths[3]}}  source"
    )
    for r in rows:
        print(f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}")


def _train(args: argparse.Namespace) -> None:
    import dataclasses
    from pathlib import Path

    from fewshot.config import ConfigError, load_config
    from fewshot.engine import distributed
    from fewshot.engine.runs import evaluate_run, load_run
    from fewshot.engine.train import train

    overrides = list(args.overrides)
    if args.resume:
        if not args.run_dir:
            raise ConfigError("--resume needs --run-dir DIR, the run to continue.")
        saved = Path(args.run_dir) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"Nothing to resume: {saved} does not exist.")
        # a named config must describe the run as it was trained: train() refuses it otherwise
        config = load_config(args.config or str(saved), overrides)
    else:
        if not args.config:
            raise ConfigError("Name a preset (`fewshot presets` lists them) or a .yaml config to train.")
        config = load_config(args.config, overrides)
    if args.data_root:  # a path as given, not parsed as YAML ('#' a comment, '2024' a number)
        config = config.model_copy(
            update={"data": config.data.model_copy(update={"data_root": args.data_root})}
        )
    distributed.init_from_env(config.train.threads)
    # under torchrun rank 0 picks the run directory and is the only one to write it
    run_dir = Path(args.run_dir) if args.run_dir else _fresh_run_dir(Path("runs") / config.name)
    run_dir = distributed.broadcast_object(run_dir)
    result = train(config, run_dir, resume=args.resume)
    best = (
        ""
        if result.best_val is None
        else f", best validation {result.best_val:.4f} at step {result.best_step}"
    )
    main = distributed.is_main()
    if main:
        procs = f" on {distributed.world_size()} processes" if distributed.active() else ""
        print(
            f"trained {config.name}: {result.steps} steps in {result.wall_time_s:.0f} s{procs}{best}; "
            f"run in {run_dir}"
        )
    if args.evaluate:
        # tested as configured now: a resume may have changed eval.episodes since best.pt was saved
        run = dataclasses.replace(load_run(run_dir), config=config)
        outcome = evaluate_run(run)
        if main:
            (run_dir / "eval.json").write_text(__import__("json").dumps(outcome.to_dict(), indent=2) + "\n")
            print(f"test {outcome.line()}")


def _fresh_run_dir(base):
    """runs/<name>, or runs/<name>-2, -3, ... if taken, so re-running a command never clobbers a run."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _eval(args: argparse.Namespace) -> None:
    import json

    from fewshot.engine import distributed
    from fewshot.engine.runs import evaluate_run, load_run

    distributed.init_from_env()  # under torchrun the episodes are shared out across ranks
    outcome = evaluate_run(
        load_run(args.checkpoint),
        args.split,
        args.episodes,
        args.ways,
        args.shots,
        args.queries,
        args.seed,
        args.data_root,
    )
    if distributed.is_main():
        print(json.dumps(outcome.to_dict()) if args.json else outcome.line())


def _predict(args: argparse.Namespace) -> None:
    import json

    from fewshot.engine.predict import predict
    from fewshot.engine.runs import load_run

    run = load_run(args.checkpoint)
    for p in predict(run.method, run.preprocess, args.support, args.query):
        if args.json:
            print(
                json.dumps(
                    {
                        "path": p.path,
                        "label": p.label,
                        "probability": p.probability,
                        "probabilities": p.probabilities,
                    }
                )
            )
        else:
            print(f"{p.path}\t{p.label}\t{p.probability:.3f}")


def _datasets(args: argparse.Namespace) -> None:
    from fewshot.data import catalog

    if args.action == "list":
        lines = catalog.list_datasets(args.data_root)
    elif args.action == "prepare":
        lines = catalog.prepare(args.name, args.data_root, args.image_size, args.download)
    elif args.action == "verify":
        lines = catalog.verify(args.name, args.data_root, args.image_size, args.download)
    else:
        path = catalog.show(
            args.name,
            args.out,
            args.split,
            args.ways,
            args.shots,
            args.queries,
            args.seed,
            args.data_root,
            args.image_size,
            args.download,
        )
        lines = [f"wrote {path}"]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Entry point; a FewShotError becomes one readable line and exit status 2.

    Run as the command (``argv`` None), it first re-executes itself once with
    malloc settings that keep freed memory (``fewshot.allocator``).
    """
    if argv is None:
        tune_malloc()
    logging.basicConfig(level=logging.WARNING, format="fewshot: %(message)s")
    args = build_parser().parse_args(argv)
    finished = False
    try:
        if args.command == "datasets":
            _datasets(args)
        elif args.command == "presets":
            _presets()
        elif args.command == "train":
            _train(args)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "predict":
            _predict(args)
        finished = True
    except FewShotError as exc:
        code = getattr(exc, "exit_code", 2)
        if code == 130 and int(os.environ.get("RANK", "0")) > 0:
            return code  # under torchrun, rank 0 says where the state was saved
        print(f"fewshot: {'stopped' if code == 130 else 'error'}: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("fewshot: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if args.command in ("train", "eval"):
            from fewshot.engine import distributed

            distributed.shutdown(finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
