"""Plot time-to-accuracy curves from recorded rows, without rerunning anything.

    python benchmarks/plot_curves.py docs/experiments/maml-omniglot-5w1s-7500/row.json \
        docs/experiments/maml-omniglot-5w1s-cosine/row.json \
        --target 13:94.9 --target 60:97 --out docs/time_to_accuracy_maml.png

Each row is a ``row.json`` written by ``benchmarks/reproduce.py --curve``
(test accuracy of kept checkpoints against training wall time). Several rows
share one figure, each labelled by the settings it overrode beyond its
preset, so runs of one preset with different schedules can be compared
(``--label`` names them instead, one per row; ``--until MIN`` leaves out
later points, to show the first minutes of long runs beside short ones).
``reproduce.py`` draws its own single-run plot with the same function.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IGNORED = ("train.steps=", "train.keep_every=", "train.val_every=", "train.val_episodes=")
"""Overrides that do not change what a curve's points measure (length, checkpointing, validation)."""


SPLIT_FILES = ("data.train_split=", "data.val_split=", "data.test_split=")


def series_label(row: dict) -> str:
    """'preset schedule' or the row's meaningful overrides, e.g. 'train.schedule=cosine'.

    Split files from one folder (``benchmarks/random_split.py``) are named by the folder.
    """
    changed = [o for o in row.get("overrides", []) if not o.startswith(IGNORED)]
    files = [o.split("=", 1)[1] for o in changed if o.startswith(SPLIT_FILES)]
    folders = {Path(f).parent.name for f in files}
    if len(files) == 3 and all(f.endswith(".txt") for f in files) and len(folders) == 1:
        changed = [o for o in changed if not o.startswith(SPLIT_FILES)] + [f"split {folders.pop()}"]
    return ", ".join(changed) if changed else "preset schedule"


def plot_curve(
    series: list[tuple[str, list[dict[str, float]]]],
    title: str,
    targets: list[tuple[float, float]],
    out: Path,
    ylabel: str = "test accuracy (%)",
) -> None:
    """Test accuracy (with 95% CI) against training minutes, one line per (label, points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series:
        minutes = [p["train_s"] / 60 for p in points]
        acc = [100 * p["accuracy"] for p in points]
        ci = [0.0 if p["ci95"] is None else 100 * p["ci95"] for p in points]  # None: 1-episode point
        ax.errorbar(minutes, acc, yerr=ci, marker="o", ms=3, capsize=2, label=f"{label} (test, 95% CI)")
    for minute, accuracy in targets:
        ax.plot([minute], [accuracy], "r*", ms=10)
    if targets:
        ax.plot([], [], "r*", label="target (half learn2learn's time)")
    ax.set_xlabel("training wall time (min, 2-core CPU; evaluation excluded)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def accuracy_label(rows: list[dict]) -> str:
    """The y axis names the episodes the rows were tested on, when they share them."""
    settings = {(row.get("ways"), row.get("shots")) for row in rows}
    if len(settings) == 1:
        ways, shots = settings.pop()
        if ways and shots:
            return f"{ways}-way {shots}-shot test accuracy (%)"
    return "test accuracy (%)"


def parse_target(text: str) -> tuple[float, float]:
    """'MIN:ACC' -> (minutes, accuracy %)."""
    try:
        minute, accuracy = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a target is MIN:ACC, e.g. 13:94.9; got {text!r}") from None
    return minute, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", type=Path, help="row.json files written with --curve")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--target", type=parse_target, action="append", default=[], metavar="MIN:ACC")
    parser.add_argument("--title", help="default: the rows' preset and BatchNorm mode")
    parser.add_argument(
        "--label", action="append", default=[], help="one per row, in order (default: its overrides)"
    )
    parser.add_argument("--until", type=float, help="leave out points after this many training minutes")
    args = parser.parse_args()
    if args.label and len(args.label) != len(args.rows):
        parser.error(f"{len(args.label)} --label for {len(args.rows)} rows: give one per row, or none")
    rows = []
    for path in args.rows:
        if not path.is_file():
            sys.exit(f"{path}: no such file (give row.json files written by benchmarks/reproduce.py --curve)")
        row = json.loads(path.read_text())
        if not row.get("curve"):
            sys.exit(f"{path} has no curve: write it with benchmarks/reproduce.py ... --keep-every N --curve")
        rows.append(row)
    labels = args.label or [series_label(row) for row in rows]
    series = []
    for label, row in zip(labels, rows, strict=True):
        points = [p for p in row["curve"] if args.until is None or p["train_s"] <= 60 * args.until]
        series.append((label, points))
    presets = sorted({f"{row['preset']} ({row['batchnorm']} BatchNorm)" for row in rows})
    title = args.title or " / ".join(presets)
    plot_curve(series, title, args.target, args.out, accuracy_label(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
