"""Episode sampling speed from cached Omniglot, and first-build versus cached-load time.

Run: FEWSHOT_DATA=<data root> python benchmarks/sampling.py
(without FEWSHOT_DATA, Omniglot is downloaded into the cache first).
The store is built in a fresh temporary cache so that ``first_build_s`` is a
real first run; ``cached_load_s`` is a second process-level load of the whole
store (all 32,460 images) plus the Vinyals train view. Episodes/s is measured
on the Vinyals train split (4,112 rotated classes), meta-batches of 32
episodes, median of repeats. The last line is one JSON object of the figures.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import torch

from fewshot.allocator import tune_malloc
from fewshot.data.datasets import load_dataset
from fewshot.data.sampler import EpisodeSampler


def episodes_per_s(dataset, ways: int, shots: int, queries: int, tasks: int = 32, repeats: int = 7) -> float:
    sampler = EpisodeSampler(dataset, ways, shots, queries, tasks=tasks, seed=0)
    sampler[0]  # warm-up
    rates, batch = [], 1
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            sampler[batch]
            batch += 1
        rates.append(10 * tasks / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    tune_malloc()  # as the fewshot command runs (fewshot/allocator.py)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        load_dataset("omniglot", "background", cache=cache, progress=False)
        first_build = time.perf_counter() - start
        loads = []
        for _ in range(5):
            start = time.perf_counter()
            train = load_dataset("omniglot", "train", cache=cache, progress=False)
            loads.append(time.perf_counter() - start)
        cached_load = statistics.median(loads)
        figures = {
            "first_build_s": round(first_build, 3),
            "cached_load_s": round(cached_load, 4),
            "episodes_per_s_5w1s15q": round(episodes_per_s(train, 5, 1, 15)),
            "episodes_per_s_20w5s15q": round(episodes_per_s(train, 20, 5, 15)),
            "store_images": int(train.store.images.shape[0]),
            "train_classes": train.num_classes,
        }
    print(f"first build of Omniglot (decode 32,460 PNGs): {figures['first_build_s']:.2f} s")
    print(f"cached load (whole store + Vinyals train view): {figures['cached_load_s']:.3f} s")
    print(f"5-way 1-shot 15-query: {figures['episodes_per_s_5w1s15q']} episodes/s (target >= 2000)")
    print(f"20-way 5-shot 15-query: {figures['episodes_per_s_20w5s15q']} episodes/s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
