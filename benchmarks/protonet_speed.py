"""Metric-method meta-training speed: Conv-4 weights channels-last against contiguous.

Setting: Prototypical Networks as Snell et al. train them on Omniglot, one
60-way 1-shot 5-query episode per step (360 images of 28x28x1), Adam,
``torch.set_num_threads(2)``. Images are random tensors of that shape: speed
does not depend on their content, and no dataset is needed. Both
configurations are built in this process and timed round-robin (one step of
each in turn, ``--rounds`` times, after a warm-up step), so a burst of load on
a shared machine hits both alike; the median step time is reported.

``fewshot`` builds metric methods channels-last (``methods/registry.py``):
oneDNN's convolutions then run in NHWC order. The last line of stdout is one
JSON object (episodes_per_s, contiguous_episodes_per_s, ratio).

    python benchmarks/protonet_speed.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fewshot.data.episodes import EpisodeBatch
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    batch = episode(60, 1, 5)
    steps = {}
    for name, memory_format in [("channels_last", torch.channels_last), ("contiguous", None)]:
        method = PrototypicalNetwork(Conv4(1), 64)
        if memory_format is not None:
            method = method.to(memory_format=memory_format)
        steps[name] = (method, torch.optim.Adam(method.parameters(), lr=1e-3))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.rounds + 1):
        for name, (method, optimiser) in steps.items():
            start = time.perf_counter()
            loss, _ = method.loss(batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    rate = {name: 1 / statistics.median(t) for name, t in times.items()}
    figures = {
        "episodes_per_s": round(rate["channels_last"], 3),
        "contiguous_episodes_per_s": round(rate["contiguous"], 3),
        "ratio": round(rate["channels_last"] / rate["contiguous"], 3),
        "images_per_episode": 360,
        "threads": torch.get_num_threads(),
    }
    print(
        f"ProtoNet 60-way 1-shot 5-query training: channels-last {figures['episodes_per_s']:.2f} "
        f"episodes/s, contiguous {figures['contiguous_episodes_per_s']:.2f} ({figures['ratio']:.2f}x)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
