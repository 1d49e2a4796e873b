"""Collect the rows written by ``benchmarks/reproduce.py`` into the table of docs/results.md.

    python benchmarks/results_table.py [--runs runs/reproduce] [--write docs/results.md]

Reads every ``<runs>/<preset>/row.json`` and prints one Markdown table row per
run (ours ± 95% CI, published, steps against the preset's, training time,
BatchNorm mode, the command that reproduces it). ``--write`` also puts the
table into a Markdown file, between the lines ``<!-- results-table -->`` and
``<!-- /results-table -->``, so the document is regenerated, not hand-edited.
The last line is one JSON object: the rows' headline figures keyed by preset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def command(row: dict) -> str:
    method, setting = row["preset"].split("-", 1)
    cmd = f"python benchmarks/reproduce.py {method} {setting}"
    if row["steps"] != row["preset_steps"]:  # cut or extended: either way the preset alone differs
        cmd += f" --steps {row['steps']}"
    if row["episodes"] != 1000:
        cmd += f" --episodes {row['episodes']}"
    if row.get("trained_by"):
        cmd += f" --trained-by {row['trained_by']}"
    for override in row.get("overrides", []):
        if not override.startswith(("train.steps=", "train.keep_every=")):  # in the row already, or no effect
            cmd += f" --set {override}"
    # Settings the preset changed after the row was trained: restated, so the command still trains it.
    for override in row.get("preset_changed", []):
        cmd += f" --set {override}"
    return f"`{cmd}`"


def verdict(row: dict) -> str:
    if row.get("published") is None:
        return "no published figure"
    if row.get("not_comparable"):  # another dataset, image size, ways, shots or test split
        return "not comparable (settings differ)"
    if row.get("published_split"):
        return f"not comparable (published on {row['published_split']} split)"
    if row.get("meets_published"):
        return "meets it"
    return "below (schedule cut)" if row["schedule_cut"] else "below"


def markdown(row: dict) -> str:
    method = row["preset"].split("-", 1)[0]
    published = "—" if row.get("published") is None else f"{row['published']:.2f}"
    if row.get("published_ci95"):
        published += f" ± {row['published_ci95']:.2f}"
    steps = f"{row['steps']:,} ({row['preset_steps']:,})"
    ci = "n/a" if row.get("ci95") is None else f"{row['ci95']:.2f}"  # None: a 1-episode test
    return (
        f"| {method} | {row['ways']}-way {row['shots']}-shot | {row['accuracy']:.2f} ± {ci} | "
        f"{published} | {verdict(row)} | {steps} | {row['train_min']:.1f} min | {row['batchnorm']} | "
        f"{command(row)} |"
    )


START, END = "<!-- results-table -->", "<!-- /results-table -->"


def write_into(path: Path, table: str) -> None:
    """Replace the text between the table markers of ``path`` with ``table``."""
    if not path.is_file():
        raise SystemExit(
            f"{path}: no such file; --write replaces the marked table in an existing Markdown file "
            f"(e.g. docs/results.md, which has the {START} and {END} lines)"
        )
    text = path.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{path}: needs one line {START} followed by one line {END} around the table")
    head, rest = text.split(START)
    tail = rest.split(END)[1]
    path.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--write", type=Path, help="Markdown file whose marked table to replace")
    args = parser.parse_args()
    rows = [json.loads(p.read_text()) for p in sorted(args.runs.glob("*/row.json"))]
    if not rows:
        raise SystemExit(f"no row.json under {args.runs}: run benchmarks/reproduce.py first")
    order = ["maml", "fomaml", "reptile", "metasgd", "anil", "protonet", "matching", "relation"]
    rows.sort(key=lambda r: (r["ways"], r["shots"], order.index(r["preset"].split("-")[0])))
    table = "\n".join(
        [
            "| method | setting | ours (± 95% CI) | published | vs published | steps (preset) "
            "| training time | BatchNorm | command |",
            "|---|---|---|---|---|---|---|---|---|",
            *(markdown(row) for row in rows),
        ]
    )
    print(table)
    if args.write:
        write_into(args.write, table)
    figures = {r["preset"]: {"accuracy": r["accuracy"], "ci95": r["ci95"], "steps": r["steps"]} for r in rows}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
