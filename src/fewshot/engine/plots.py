"""Learning curves from a run's metrics.jsonl, drawn with matplotlib."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_metrics(metrics: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line that does not parse (one cut short when the run was
    killed mid-write) is skipped rather than making the whole log unreadable."""
    records = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def learning_curve(metrics: Path, out: Path, title: str = "") -> Path:
    """Training loss and accuracy, and validation score, against the step."""
    records = read_metrics(metrics)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("meta-training loss")
    ax_loss.grid(alpha=0.3)
    if train and "accuracy" in train[0]:
        ax_acc.plot([r["step"] for r in train], [r["accuracy"] for r in train], lw=1, label="train episodes")
    if val:
        ax_acc.plot([r["step"] for r in val], [r["val"] for r in val], "o-", label="validation")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy (regression: -MSE)")
    ax_acc.grid(alpha=0.3)
    if train or val:
        ax_acc.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
