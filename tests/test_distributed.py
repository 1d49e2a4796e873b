"""torchrun with 2 gloo processes on 127.0.0.1 against one process over the same episodes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import engine_config, engine_dataset

from fewshot.data.sampler import EpisodeSampler
from fewshot.engine import checkpoint, distributed
from fewshot.engine.setup import RankShare

pytestmark = pytest.mark.slow

FAMILIES = [
    {"name": "protonet"},
    {"name": "maml", "inner_lr": 0.1, "inner_steps": 1},
    {"name": "reptile", "inner_lr": 0.1, "inner_steps": 2},
]


@pytest.fixture
def dataset_root(tmp_path) -> Path:
    return engine_dataset(tmp_path / "tiny")


def write_config(tmp_path: Path, root: Path, method: dict) -> Path:
    """SGD, so final weights differ exactly by the (scaled) difference of meta-gradients."""
    train = {"steps": 3, "meta_batch": 4, "optimizer": "sgd", "lr": 0.5}
    train |= {"val_episodes": 5, "checkpoint_every": 100}
    return engine_config(tmp_path, root, method, train=train, eval={"episodes": 7, "chunk": 2})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fewshot(cwd: Path, *args: str, procs: int = 1) -> subprocess.CompletedProcess:
    """``python -m fewshot ...``, or the same under torchrun with ``procs`` gloo processes."""
    return launch(cwd, ["-m", "fewshot", *args], procs)


def launch(cwd: Path, argv: list[str], procs: int = 1) -> subprocess.CompletedProcess:
    """``python ARGV``, or under torchrun with ``procs`` processes; it must exit with status 0."""
    launcher = [sys.executable]
    if procs > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={procs}",
            "--nnodes=1",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
        ]
    out = subprocess.run([*launcher, *argv], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run / "checkpoints" / "last.pt")["method"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point() and "running" not in key:  # running stats: averaged, not summed
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("method", FAMILIES, ids=[m["name"] for m in FAMILIES])
def test_two_processes_equal_one(tmp_path, dataset_root, method):
    config = write_config(tmp_path, dataset_root, method)
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    fewshot(single, "train", str(config))
    out = fewshot(multi, "train", str(config), procs=2)
    # rank 0 alone chose and wrote the run directory
    assert [p.name for p in (multi / "runs").iterdir()] == [f"tiny-{method['name']}"]
    assert out.stdout.count("trained tiny-") == 1 and "on 2 processes" in out.stdout
    a = weights(single / "runs" / f"tiny-{method['name']}")
    b = weights(multi / "runs" / f"tiny-{method['name']}")
    assert_same_weights(a, b)
    # the logged meta-training loss is the mean over ranks: the single-process loss
    logs = [
        [
            json.loads(x)
            for x in (d / "runs" / f"tiny-{method['name']}" / "metrics.jsonl").read_text().splitlines()
        ]
        for d in (single, multi)
    ]
    losses = [[r["loss"] for r in log if "loss" in r] for log in logs]
    assert len(losses[1]) == 3
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)
    # sharded validation and evaluation gather every episode
    vals = [[r["val"] for r in log if "val" in r] for log in logs]
    assert vals[0] == pytest.approx(vals[1], abs=1e-9)
    evals = [
        json.loads((d / "runs" / f"tiny-{method['name']}" / "eval.json").read_text()) for d in (single, multi)
    ]
    assert evals[1]["episodes"] == 7 and evals[1]["accuracy"] == pytest.approx(evals[0]["accuracy"])


def test_first_step_meta_gradient_equals_one_process(tmp_path, dataset_root):
    """With SGD at lr 1, one step moves the weights by exactly minus the meta-gradient."""
    config = write_config(tmp_path, dataset_root, FAMILIES[1])
    overrides = ["--set", "train.steps=1", "--set", "train.lr=1.0", "--no-eval"]
    for d, procs in (("single", 1), ("multi", 2)):
        (tmp_path / d).mkdir()
        fewshot(tmp_path / d, "train", str(config), "--run-dir", "run", *overrides, procs=procs)
    from fewshot.config import load_config
    from fewshot.engine.setup import build_experiment

    torch.manual_seed(0)
    start = build_experiment(load_config(str(config))).method.state_dict()
    g1 = {k: start[k] - v for k, v in weights(tmp_path / "single" / "run").items() if "running" not in k}
    g2 = {k: start[k] - v for k, v in weights(tmp_path / "multi" / "run").items() if "running" not in k}
    assert any(g.abs().max() > 1e-4 for g in g1.values())  # the step did something
    assert_same_weights(g1, g2)


def test_distributed_resume_continues_the_same_run(tmp_path, dataset_root):
    config = write_config(tmp_path, dataset_root, FAMILIES[0])
    fewshot(tmp_path, "train", str(config), "--run-dir", "straight", "--set", "train.steps=4", "--no-eval")
    fewshot(
        tmp_path, "train", str(config), "--run-dir", "resumed", "--set", "train.steps=2", "--no-eval", procs=2
    )
    fewshot(
        tmp_path, "train", "--run-dir", "resumed", "--resume", "--set", "train.steps=4", "--no-eval", procs=2
    )
    assert checkpoint.load(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 4
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))


LEAVE = """
import os, time, torch
from fewshot.engine import distributed
distributed.init_from_env(1)
torch.optim.Adam(torch.nn.Linear(2, 2).parameters())  # as train() does, after the group exists
distributed.mean_scalars([1.0])
distributed.shutdown()

def gloo_threads():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{t}/comm").read().strip())
        except FileNotFoundError:  # it left between listing and reading
            pass
    return [n for n in names if "gloo" in n]

# A joined thread can stay listed for a moment: pthread_join returns when the kernel clears its
# tid, before the task is reaped. A thread that was never joined stays for good.
deadline = time.monotonic() + 10
while (left := gloo_threads()) and time.monotonic() < deadline:
    time.sleep(0.05)
with open(f"gloo-threads-{os.environ['RANK']}", "w") as f:  # a file each: torchrun's -u interleaves prints
    f.write(",".join(left))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_shutdown_joins_the_gloo_threads(tmp_path):
    """The group must really be freed on leaving: gloo threads alive into interpreter finalisation
    can abort a process that has done all its work (5 of 60 two-process `fewshot train` runs on a
    loaded machine did, before the fix; a CI run failed so).
    torch.optim's first optimiser imports a module that binds the group as a default argument."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    launch(tmp_path, [str(script)], procs=2)
    assert [(tmp_path / f"gloo-threads-{r}").read_text() for r in (0, 1)] == ["", ""]


def test_meta_batch_that_does_not_split(tmp_path, dataset_root):
    config = write_config(tmp_path, dataset_root, FAMILIES[0])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "-m",
            "fewshot",
            "train",
            str(config),
            "--set",
            "train.meta_batch=3",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "train.meta_batch=3 does not split evenly across 2 processes" in out.stderr
    assert "Traceback" not in out.stderr.split("fewshot: error")[0][-200:]


def test_rank_shares_are_the_single_process_batch(tmp_path, dataset_root, monkeypatch):
    """Rank r's share of step k is the r-th slice of the single-process meta-batch k."""
    from fewshot.data.datasets import load_dataset

    ds = load_dataset(f"folder:{dataset_root}", "train", image_size=16)
    sampler = EpisodeSampler(ds, 3, 1, 2, tasks=4, seed=5)
    for k in (0, 3):
        whole = sampler[k]
        parts = []
        for r in range(2):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            monkeypatch.setattr(distributed, "world_size", lambda: 2)
            parts.append(RankShare(sampler, 4)[k])
        assert torch.equal(torch.cat([p.support for p in parts]), whole.support)
        assert torch.equal(torch.cat([p.query for p in parts]), whole.query)


def test_shards_cover_every_episode_once(monkeypatch):
    for world in (1, 2, 3, 5):
        for count in (0, 1, 7, 600):
            seen = []
            for r in range(world):
                monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
                seen += list(distributed.shard(count))
            assert seen == list(range(count))
