"""Meta-training tasks/s with 1 and 2 torchrun processes (gloo, this machine's cores).

Each configuration is a real ``fewshot train`` run launched by torchrun on
127.0.0.1 for ``--steps`` meta-batches on Omniglot (FEWSHOT_DATA must point
at the data). Speed comes from the run's own metrics.jsonl (training time
only: no start-up, data loading, validation or checkpoints): tasks/s over
windows of 5 steps after ``--warmup`` steps, the median window reported.

The machine's cores are shared out: 1 process gets all of them as intra-op
threads, 2 processes get half each (``threads_per_process`` in the JSON), so
the comparison is intra-op against process parallelism on the same cores.
On a 2-core machine the gain is bounded by 2 and eaten into by the all-reduce
and by smaller per-process batches; more machines or GPUs are where the
process count pays.

Run: FEWSHOT_DATA=... python benchmarks/distributed.py [--steps 40]
The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    # name: (preset, extra overrides)
    "maml_so": ("maml-omniglot-5w1s", []),
    "protonet": ("protonet-omniglot-5w1s", ["train.meta_batch=2"]),
}
WINDOW = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(preset: str, overrides: list[str], procs: int, steps: int, workdir: Path) -> list[dict]:
    """One torchrun training run; returns its training log records."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // procs)
    run_dir = workdir / f"{preset}-{procs}"
    sets = [
        f"train.steps={steps}",
        "train.val_every=1000000",
        "train.checkpoint_every=1000000",
        "train.log_every=1",
        f"train.threads={threads}",
        *overrides,
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={procs}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "fewshot",
        "train",
        preset,
        "--run-dir",
        str(run_dir),
        "--no-eval",
        *[a for s in sets for a in ("--set", s)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{preset} with {procs} processes failed:\n{out.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def tasks_per_s(records: list[dict], meta_batch: int, warmup: int) -> float:
    """Median over windows of WINDOW steps of (tasks done) / (training seconds)."""
    rates = []
    usable = [r for r in records if r["step"] >= warmup]
    for a, b in zip(usable[::WINDOW], usable[WINDOW::WINDOW], strict=False):
        rates.append((b["step"] - a["step"]) * meta_batch / (b["elapsed_s"] - a["elapsed_s"]))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if not os.environ.get("FEWSHOT_DATA"):
        sys.exit("Set FEWSHOT_DATA to the folder holding omniglot/ (see the README's data section).")
    from fewshot.config import load_config

    figures: dict[str, object] = {"cores": os.cpu_count(), "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (preset, overrides) in CONFIGS.items():
            meta_batch = load_config(preset, overrides).train.meta_batch
            for procs in (1, 2):
                records = run(preset, overrides, procs, args.steps, Path(tmp))
                rate = tasks_per_s(records, meta_batch, args.warmup)
                figures[f"{name}_{procs}proc_tasks_per_s"] = round(rate, 2)
                print(
                    f"{preset} meta-batch {meta_batch}: {procs} process(es) x "
                    f"{max(1, (os.cpu_count() or 1) // procs)} thread(s): {rate:.1f} tasks/s",
                    flush=True,
                )
            figures[f"{name}_speedup"] = round(
                figures[f"{name}_2proc_tasks_per_s"] / figures[f"{name}_1proc_tasks_per_s"], 3
            )
    figures["threads_per_process"] = {"1": os.cpu_count(), "2": max(1, (os.cpu_count() or 1) // 2)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
