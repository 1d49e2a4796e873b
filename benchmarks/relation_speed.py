"""Relation Networks meta-training speed: the first relation convolution split by halves.

Setting: the four Omniglot presets' training episodes (5-way 1-shot 19
queries a class, 5-way 5-shot 15, 20-way 1-shot 10, 20-way 5-shot 5), the
paper's networks (embedding Conv-4 without the last two pools, 64-channel
7x7 maps; relation module of two conv blocks and two linear layers), MSE
loss, Adam, channels-last weights as ``fewshot`` builds them,
``torch.set_num_threads(2)``. Images are random tensors of that shape: speed
does not depend on their content, and no dataset is needed.

Two configurations per setting, built in this process and timed
round-robin (one training step of each in turn, ``--rounds`` times, after a
warm-up step), median step time reported as episodes/s:

* ``concat``: the paper's formulation, every (class, query) pair of feature
  maps concatenated along channels and convolved, as the method did before;
* ``split`` (the method now, ``RelationModule.compare``): the first
  convolution taken once per class map and once per query map with its two
  halves of weights, the results added for each pair. Same numbers
  (``tests/test_metric_methods.py`` checks values and gradients in float64).

Test time is timed the same way, on the presets' test chunks (16 tasks of
15 queries a class, eval mode, no gradients), three configurations per
setting:

* ``eval_one_call``: all the chunk's images embedded in one backbone call
  and all its (class, query) pairs scored in one relation-module call, as
  the method did first (at 20 ways 5,120 to 6,400 images, whose first-layer
  activations take 1 to 1.3 GB, and 96,000 pairs, 1.2 GB in each relation
  layer);
* ``eval_image_blocks``: the images embedded in blocks of
  ``protonet.EVAL_BLOCK_ELEMENTS`` input elements (334 Omniglot images),
  the pairs still in one call;
* ``eval`` (the method now, ``RelationNetwork.relations``): the pairs too
  in blocks of ``relation.PAIR_BLOCK_ELEMENTS`` activation elements (at 20
  ways one task's 6,000 pairs a call).

Blocks are allowed by running statistics: an image's embedding, and a
pair's relation, then depend on it alone.

    python benchmarks/relation_speed.py [--rounds 7]

The last line of stdout is one JSON object: per setting,
``<setting>_episodes_per_s`` (split), ``<setting>_concat_episodes_per_s``,
``<setting>_speedup``, and for test episodes
``<setting>_eval_episodes_per_s``, ``<setting>_eval_one_call_episodes_per_s``,
``<setting>_eval_image_blocks_episodes_per_s`` and ``<setting>_eval_speedup``
(blocks of both against one call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch
from protonet_speed import episode, training_step

from fewshot.allocator import malloc_mode, tune_malloc
from fewshot.data.episodes import EpisodeBatch
from fewshot.methods import protonet
from fewshot.methods.relation import RelationNetwork

SETTINGS = {"5w1s": (5, 1, 19), "5w5s": (5, 5, 15), "20w1s": (20, 1, 10), "20w5s": (20, 5, 5)}
"""Ways, shots and queries per class of the presets' training episodes."""
EVAL_QUERIES, EVAL_CHUNK = 15, 16
"""Queries per class of the presets' test episodes, and test tasks per forward pass (``eval.chunk``)."""


class ConcatPairs(RelationNetwork):
    """The paper's formulation: the relation module convolves concatenated pairs."""

    def relations(self, query_maps: torch.Tensor, class_maps: torch.Tensor) -> torch.Tensor:
        return self.relation.compare_concatenated(class_maps, query_maps)


class OneCallPairs(RelationNetwork):
    """Every (class, query) pair of all the tasks scored in one relation-module call."""

    def relations(self, query_maps: torch.Tensor, class_maps: torch.Tensor) -> torch.Tensor:
        return self.relation.compare(class_maps, query_maps)


def make_step(kind: type[RelationNetwork], batch: EpisodeBatch) -> Callable[[], None]:
    """One training step (loss, backward, Adam) of a fresh Relation Network."""
    torch.manual_seed(0)
    return training_step(kind((1, 28, 28)).to(memory_format=torch.channels_last), batch)


def make_eval(ways: int, shots: int, images: bool, pairs: bool) -> Callable[[], None]:
    """One test chunk's query logits (eval mode, no gradients), images and pairs in blocks or not."""
    torch.manual_seed(0)
    kind = RelationNetwork if pairs else OneCallPairs
    method = kind((1, 28, 28)).to(memory_format=torch.channels_last).eval()
    batch = EpisodeBatch.stack([episode(ways, shots, EVAL_QUERIES)[0] for _ in range(EVAL_CHUNK)])
    block = protonet.EVAL_BLOCK_ELEMENTS if images else 1 << 62

    def forward() -> None:
        with torch.no_grad(), mock.patch.object(protonet, "EVAL_BLOCK_ELEMENTS", block):
            method.query_logits(batch)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed steps of each configuration")
    args = parser.parse_args()
    tune_malloc()  # as the fewshot command runs: freed memory kept (fewshot/allocator.py)
    torch.set_num_threads(2)

    steps: dict[str, Callable[[], None]] = {}
    for name, shape in SETTINGS.items():
        batch = episode(*shape)
        steps[f"{name}_concat"] = make_step(ConcatPairs, batch)
        steps[f"{name}_split"] = make_step(RelationNetwork, batch)
        ways, shots, _ = shape
        steps[f"{name}_eval_one_call"] = make_eval(ways, shots, images=False, pairs=False)
        steps[f"{name}_eval_image_blocks"] = make_eval(ways, shots, images=True, pairs=False)
        steps[f"{name}_eval"] = make_eval(ways, shots, images=True, pairs=True)
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    def per_s(name: str, episodes: int = 1) -> float:
        return episodes / statistics.median(times[name])

    print(f"Relation Networks, {args.rounds} rounds, median, malloc {malloc_mode()}")
    print(
        f"{'setting':8} {'concat ep/s':>12} {'split ep/s':>12} {'speedup':>8}"
        f"   {'test one call ep/s':>20} {'image blocks ep/s':>18} {'+ pair blocks ep/s':>19}"
        f" {'speedup':>8}"
    )
    figures: dict[str, float] = {}
    for name in SETTINGS:
        concat, split = per_s(f"{name}_concat"), per_s(f"{name}_split")
        one_call = per_s(f"{name}_eval_one_call", EVAL_CHUNK)
        image_blocks = per_s(f"{name}_eval_image_blocks", EVAL_CHUNK)
        blocked = per_s(f"{name}_eval", EVAL_CHUNK)
        print(
            f"{name:8} {concat:12.2f} {split:12.2f} {split / concat:7.2f}x"
            f"   {one_call:20.2f} {image_blocks:18.2f} {blocked:19.2f} {blocked / one_call:7.2f}x"
        )
        figures[f"{name}_episodes_per_s"] = round(split, 2)
        figures[f"{name}_concat_episodes_per_s"] = round(concat, 2)
        figures[f"{name}_speedup"] = round(split / concat, 2)
        figures[f"{name}_eval_episodes_per_s"] = round(blocked, 2)
        figures[f"{name}_eval_one_call_episodes_per_s"] = round(one_call, 2)
        figures[f"{name}_eval_image_blocks_episodes_per_s"] = round(image_blocks, 2)
        figures[f"{name}_eval_speedup"] = round(blocked / one_call, 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
