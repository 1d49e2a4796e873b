"""MAML meta-training speed against learn2learn 0.2.0, in one process, on the same network and tasks.

learn2learn imports torchvision, which does not import beside this project's
torch 2.13.0, so this script runs in a separate environment that holds both
libraries on one torch (``benchmarks/learn2learn_env.sh`` builds it)::

    bash benchmarks/learn2learn_env.sh .venv-learn2learn    # once; about 6 GB
    .venv-learn2learn/bin/python benchmarks/maml_vs_learn2learn.py [--rounds 9]

Setting: ``benchmarks/maml_speed.py``'s (Conv-4 with 64 filters and
max-pooling, 5-way 1-shot with one query per class, 28x28x1, meta-batch 32,
one inner step, inner lr 0.4, Adam 1e-3, two threads). learn2learn's step is
its documented MAML loop (``examples/vision/maml_omniglot.py``): per task
``clone()``, ``adapt(support loss)``, query loss ``backward()``; then the
gradients averaged over the tasks and one Adam step. Its network is the very
``Classifier(Conv4)`` fewshot trains, with ``nn.BatchNorm2d`` in training mode
(batch statistics, as fewshot's transductive mode). All six configurations
(fewshot's vectorised and loop paths, learn2learn's loop, each at second and
first order) are timed round-robin in this process, median of ``--rounds``
steps, so the ratios compare them on one torch and one machine state. Peak
memory comes from a fresh process per configuration, as in maml_speed.py.

Before timing, the script checks that both libraries compute the same thing:
fewshot's second-order meta-gradient (vectorised path) against
learn2learn's on the same initial weights and tasks, as a relative
difference of the whole gradient vector, in float64 so that rounding cannot
hide a real difference (in float32 the two differ by about 1e-3, most of it
from the fused forward's batch-norm fold, whose statistics come from
covariances; fewshot's own loop path differs from learn2learn's by 2e-4).

Last line: one JSON object with ``l2l_so_tasks_per_s``, ``l2l_fo_tasks_per_s``,
``so_tasks_per_s``, ``fo_tasks_per_s``, ``loop_so_tasks_per_s``,
``loop_fo_tasks_per_s``, ``ratio_so_vs_l2l``, ``ratio_fo_vs_l2l``,
``ratio_so`` (vectorised against fewshot's loop), ``mem_ratio_so_vs_l2l``,
``grad_rel_diff`` and the versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from maml_speed import CONFIGS, INNER_LR, TASKS, make_batch, make_step, peak_rss_mb, time_round_robin

from fewshot.allocator import malloc_mode, tune_malloc
from fewshot.data.episodes import EpisodeBatch
from fewshot.methods.maml import MAML
from fewshot.models.backbones import Classifier, Conv4

try:
    import learn2learn as l2l
except ImportError as err:  # pragma: no cover - depends on the environment
    sys.exit(
        f"maml_vs_learn2learn.py needs learn2learn 0.2.0 ({err}). It lives in a separate environment: "
        "run `bash benchmarks/learn2learn_env.sh .venv-learn2learn`, then "
        "`.venv-learn2learn/bin/python benchmarks/maml_vs_learn2learn.py`."
    )

L2L_CONFIGS = {"l2l-so": False, "l2l-fo": True}
"""learn2learn configurations: name -> first_order."""
FEWSHOT_CONFIGS = ("vmap-so", "loop-so", "vmap-fo", "loop-fo")


def conv4_classifier() -> Classifier:
    """The benchmark's network, seeded so every configuration starts from the same weights."""
    torch.manual_seed(0)
    ways = int(make_batch().support_labels.max()) + 1
    return Classifier(Conv4(1, 64, 4, track_running_stats=False), 64, ways)


def l2l_meta_gradient(maml: torch.nn.Module, batch: EpisodeBatch) -> torch.Tensor:
    """learn2learn's MAML loop over the tasks; leaves the averaged meta-gradient in ``.grad``."""
    tasks = batch.support.shape[0]
    losses = []
    for t in range(tasks):
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner(batch.support[t]), batch.support_labels[t]))
        loss = F.cross_entropy(learner(batch.query[t]), batch.query_labels[t])
        loss.backward()
        losses.append(loss.detach())
    for p in maml.parameters():
        if p.grad is not None:
            p.grad.mul_(1.0 / tasks)
    return torch.stack(losses).mean()


def make_l2l_step(first_order: bool, batch: EpisodeBatch) -> Callable[[], None]:
    """One learn2learn MAML meta-training step (its example's loop, then Adam)."""
    maml = l2l.algorithms.MAML(conv4_classifier(), lr=INNER_LR, first_order=first_order)
    optimiser = torch.optim.Adam(maml.parameters(), lr=1e-3)

    def step() -> None:
        optimiser.zero_grad()
        l2l_meta_gradient(maml, batch)
        optimiser.step()

    return step


def gradient_agreement(batch: EpisodeBatch) -> float:
    """||g_fewshot - g_l2l|| / ||g_l2l|| for second-order MAML from the same weights and tasks (float64)."""
    batch = EpisodeBatch(
        support=batch.support.double(),
        support_labels=batch.support_labels,
        query=batch.query.double(),
        query_labels=batch.query_labels,
    )
    ours = conv4_classifier().double()
    theirs = copy.deepcopy(ours)
    method = MAML(ours, inner_lr=INNER_LR, path="vmap")
    loss, _ = method.loss(batch)
    loss.backward()
    l2l_meta_gradient(l2l.algorithms.MAML(theirs, lr=INNER_LR), batch)
    mine = dict(ours.named_parameters())
    diff, norm = 0.0, 0.0
    for name, p in theirs.named_parameters():
        diff += float((mine[name].grad - p.grad).pow(2).sum())
        norm += float(p.grad.pow(2).sum())
    return (diff / norm) ** 0.5


def measure_memory_here(name: str) -> dict[str, float]:
    """Build one configuration, take three steps, return base and peak RSS (MB)."""
    torch.set_num_threads(2)
    batch = make_batch()
    step = make_l2l_step(L2L_CONFIGS[name], batch) if name in L2L_CONFIGS else make_step(CONFIGS[name], batch)
    base = peak_rss_mb()
    for _ in range(3):
        step()
    return {"base_mb": base, "peak_mb": peak_rss_mb()}


def measure_memory(name: str) -> dict[str, float]:
    """``measure_memory_here`` in a fresh interpreter, so peaks never mix."""
    out = subprocess.run(
        [sys.executable, __file__, "--measure-memory", name],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--measure-memory", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_memory:
        print(json.dumps(measure_memory_here(args.measure_memory)))
        return

    tune_malloc()  # as maml_speed.py and the fewshot command run
    names = [*FEWSHOT_CONFIGS, *L2L_CONFIGS]
    memory = {name: measure_memory(name) for name in names}

    torch.set_num_threads(2)
    batch = make_batch()
    rel = gradient_agreement(batch)
    print(f"second-order meta-gradient, fewshot (vmap) against learn2learn: relative difference {rel:.2e}")

    steps = {name: make_step(CONFIGS[name], batch) for name in FEWSHOT_CONFIGS}
    steps.update({name: make_l2l_step(fo, batch) for name, fo in L2L_CONFIGS.items()})
    print(
        f"MAML, Conv-4 64 filters, 5-way 1-shot 1-query 28x28x1, meta-batch {TASKS}, 1 inner step, "
        f"lr {INNER_LR}, Adam, 2 threads, {args.rounds} rounds; torch {torch.__version__}, "
        f"learn2learn {l2l.__version__}"
    )
    speed = time_round_robin(steps, args.rounds)
    for name in names:
        mem = memory[name]
        print(
            f"  {name:8s} {speed[name]:7.1f} tasks/s   peak RSS {mem['peak_mb']:5.0f} MB "
            f"(base {mem['base_mb']:.0f} MB, +{mem['peak_mb'] - mem['base_mb']:.0f} MB)"
        )

    result = {
        "so_tasks_per_s": round(speed["vmap-so"], 2),
        "fo_tasks_per_s": round(speed["vmap-fo"], 2),
        "loop_so_tasks_per_s": round(speed["loop-so"], 2),
        "loop_fo_tasks_per_s": round(speed["loop-fo"], 2),
        "l2l_so_tasks_per_s": round(speed["l2l-so"], 2),
        "l2l_fo_tasks_per_s": round(speed["l2l-fo"], 2),
        "ratio_so_vs_l2l": round(speed["vmap-so"] / speed["l2l-so"], 3),
        "ratio_fo_vs_l2l": round(speed["vmap-fo"] / speed["l2l-fo"], 3),
        "ratio_so": round(speed["vmap-so"] / speed["loop-so"], 3),
        "ratio_fo": round(speed["vmap-fo"] / speed["loop-fo"], 3),
        "loop_so_vs_l2l": round(speed["loop-so"] / speed["l2l-so"], 3),
        "mem_ratio_so_vs_l2l": round(memory["vmap-so"]["peak_mb"] / memory["l2l-so"]["peak_mb"], 3),
        "peak_mb": {name: round(mem["peak_mb"]) for name, mem in memory.items()},
        "grad_rel_diff": float(f"{rel:.3g}"),
        "rounds": args.rounds,
        "malloc": malloc_mode(),
        "torch": torch.__version__,
        "learn2learn": l2l.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
