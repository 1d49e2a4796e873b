"""Metric-method meta-training speed: channels-last weights, and malloc that keeps freed memory.

Setting: Prototypical Networks as Snell et al. train them on Omniglot, one
60-way 1-shot 5-query episode per step (360 images of 28x28x1), Adam,
``torch.set_num_threads(2)``. Images are random tensors of that shape: speed
does not depend on their content, and no dataset is needed.

Two figures, each a median step time:

* **Memory format.** ``fewshot`` builds metric methods channels-last
  (``methods/registry.py``): oneDNN's convolutions then run in NHWC order.
  Both configurations are built in this process and timed round-robin (one
  step of each in turn, ``--rounds`` times, after a warm-up step), so a burst
  of load on a shared machine hits both alike.
* **malloc.** The ``fewshot`` command and these scripts re-execute themselves
  with glibc malloc settings that keep freed blocks (``fewshot/allocator.py``).
  glibc reads them only at process start, so this comparison runs the
  channels-last step in fresh processes, alternately with the system's
  settings and with the tuned ones (``--pairs`` of each), and reports the
  median of each side's episodes/s, page faults per step and peak resident
  size.

    python benchmarks/protonet_speed.py [--rounds 15] [--pairs 3]

The last line of stdout is one JSON object (episodes_per_s,
contiguous_episodes_per_s, ratio, malloc_system_episodes_per_s,
malloc_tuned_episodes_per_s, malloc_ratio, faults per step and peak MB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from maml_speed import peak_rss_mb

from fewshot.allocator import MARKER, OPT_OUT, malloc_mode, tune_malloc, tuned_environment
from fewshot.data.episodes import EpisodeBatch
from fewshot.methods.base import Method
from fewshot.methods.protonet import PrototypicalNetwork
from fewshot.models.backbones import Conv4


def episode(ways: int, shots: int, queries: int) -> EpisodeBatch:
    labels = torch.arange(ways)
    return EpisodeBatch(
        support=torch.rand(1, ways * shots, 1, 28, 28),
        support_labels=labels.repeat_interleave(shots).unsqueeze(0),
        query=torch.rand(1, ways * queries, 1, 28, 28),
        query_labels=labels.repeat_interleave(queries).unsqueeze(0),
    )


def training_step(method: Method, batch: EpisodeBatch) -> Callable[[], None]:
    """One training step (loss, backward, Adam) of ``method`` on ``batch``."""
    optimiser = torch.optim.Adam(method.parameters(), lr=1e-3)

    def step() -> None:
        loss, _ = method.loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    return step


def make_step(batch: EpisodeBatch, channels_last: bool) -> Callable[[], None]:
    """One training step of a fresh Prototypical Network."""
    method = PrototypicalNetwork(Conv4(1), 64)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    return training_step(method, batch)


def measure_here(rounds: int) -> dict[str, float]:
    """Channels-last step in this process: episodes/s, minor page faults per step, peak MB."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    step = make_step(episode(60, 1, 5), channels_last=True)
    for _ in range(3):
        step()
    times, faults = [], []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {
        "episodes_per_s": 1 / statistics.median(times),
        "faults_per_step": statistics.median(faults),
        "peak_mb": peak_rss_mb(),
        "malloc": malloc_mode(),
    }


def measure_in_process(mode: str, rounds: int) -> dict[str, float]:
    """``measure_here`` in a fresh interpreter with the system's or the tuned malloc settings."""
    clean = {k: v for k, v in os.environ.items() if k not in (MARKER, OPT_OUT, "GLIBC_TUNABLES")}
    env = tuned_environment(clean) if mode == "tuned" else {**clean, OPT_OUT: "system"}
    if env is None:
        raise SystemExit("the malloc comparison needs Linux with glibc")
    out = subprocess.run(
        [sys.executable, __file__, "--measure", "--rounds", str(rounds)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    if figures["malloc"] != mode:
        raise SystemExit(f"asked for malloc {mode}, the process ran with {figures['malloc']}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=3, help="processes per malloc setting")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_here(args.rounds)))
        return
    tune_malloc()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    batch = episode(60, 1, 5)
    steps = {"channels_last": make_step(batch, True), "contiguous": make_step(batch, False)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.rounds + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    rate = {name: 1 / statistics.median(t) for name, t in times.items()}

    runs: dict[str, list[dict[str, float]]] = {"system": [], "tuned": []}
    for _ in range(args.pairs):
        for mode in runs:
            runs[mode].append(measure_in_process(mode, args.rounds))

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    figures = {
        "episodes_per_s": round(rate["channels_last"], 3),
        "contiguous_episodes_per_s": round(rate["contiguous"], 3),
        "ratio": round(rate["channels_last"] / rate["contiguous"], 3),
        "malloc": malloc_mode(),
        "malloc_system_episodes_per_s": round(median("system", "episodes_per_s"), 3),
        "malloc_tuned_episodes_per_s": round(median("tuned", "episodes_per_s"), 3),
        "malloc_ratio": round(median("tuned", "episodes_per_s") / median("system", "episodes_per_s"), 3),
        "malloc_system_faults_per_step": round(median("system", "faults_per_step")),
        "malloc_tuned_faults_per_step": round(median("tuned", "faults_per_step")),
        "malloc_system_peak_mb": round(median("system", "peak_mb")),
        "malloc_tuned_peak_mb": round(median("tuned", "peak_mb")),
        "images_per_episode": 360,
        "threads": torch.get_num_threads(),
    }
    print(
        f"ProtoNet 60-way 1-shot 5-query training (malloc {figures['malloc']}): channels-last "
        f"{figures['episodes_per_s']:.2f} episodes/s, contiguous {figures['contiguous_episodes_per_s']:.2f} "
        f"({figures['ratio']:.2f}x)"
    )
    for mode in runs:
        print(
            f"  malloc {mode:6s} (channels-last, {args.pairs} processes): "
            f"{median(mode, 'episodes_per_s'):.2f} episodes/s, "
            f"{median(mode, 'faults_per_step'):,.0f} page faults per step, "
            f"peak {median(mode, 'peak_mb'):.0f} MB"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
