"""The engine through the ``fewshot`` command: train, eval, predict, resume, and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import engine_config, engine_dataset, image_folder

from fewshot.cli import main
from fewshot.config import ConfigError, load_config, preset_names, resume_conflicts, training_differences
from fewshot.engine import checkpoint
from fewshot.engine.evaluate import mean_ci95
from fewshot.engine.train import Interrupted, RunMismatch, TrainingStopped, train
from fewshot.errors import FewShotError

pytestmark = pytest.mark.slow


@pytest.fixture
def dataset_root(tmp_path) -> Path:
    return engine_dataset(tmp_path / "tiny")


FAMILIES = [
    {"name": "protonet"},
    {"name": "matching"},
    {"name": "relation"},
    {"name": "maml", "inner_lr": 0.1, "inner_steps": 1},
    {"name": "reptile", "inner_lr": 0.1, "inner_steps": 2},
]


@pytest.mark.parametrize("method", FAMILIES, ids=[m["name"] for m in FAMILIES])
def test_train_eval_predict_through_the_cli(tmp_path, dataset_root, method, capsys):
    config = engine_config(tmp_path, dataset_root, method)
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "trained tiny-" in out and "test accuracy" in out
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "learning_curve.png",
        "eval.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val" in r] == [2, 4]

    assert main(["eval", str(run), "--json", "--episodes", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "ci95", "episodes", "ways", "shots", "queries", "split", "method", "batchnorm"):
        assert key in result
    assert result["episodes"] == 5 and result["ways"] == 3 and result["split"] == "test"
    assert 0.0 <= result["accuracy"] <= 1.0

    queries = [str(p) for p in sorted((dataset_root / "test" / "s0").iterdir())[:2]]
    support = tmp_path / "support"
    image_folder(support, {"alpha": 2, "beta": 2, "gamma": 2}, size=20)
    assert (
        main(
            [
                "predict",
                str(run / "checkpoints" / "best.pt"),
                "--support",
                str(support),
                "--query",
                *queries,
                "--json",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    record = json.loads(lines[0])
    assert record["label"] in ("alpha", "beta", "gamma")
    assert math.isclose(sum(record["probabilities"].values()), 1.0, rel_tol=1e-5)
    assert record["probability"] == max(record["probabilities"].values())


def test_sinusoid_maml_trains_and_evaluates(tmp_path, capsys):
    config = {
        "name": "sine",
        "task": "sinusoid",
        "method": {"name": "maml", "backbone": "mlp", "inner_lr": 0.01, "inner_steps_test": 2},
        "train_episode": {"ways": 1, "shots": 5, "queries": 5},
        "train": {"steps": 3, "meta_batch": 4, "val_every": 3, "val_episodes": 25},
        "eval": {"episodes": 30, "queries": 10},
    }
    path = tmp_path / "sine.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    assert "test mse" in capsys.readouterr().out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run / "checkpoints" / "last.pt")["method"]


@pytest.mark.parametrize("method", [FAMILIES[0], FAMILIES[3]], ids=["protonet", "maml"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, dataset_root, method):
    path = engine_config(
        tmp_path, dataset_root, method, train={"steps": 6, "checkpoint_every": 100, "keep_every": 2}
    )
    config = load_config(str(path))
    train(config, tmp_path / "straight", progress=False)
    with pytest.raises(Interrupted, match="stop_at=3 at step 3/6"):
        train(config, tmp_path / "broken", progress=False, stop_at=3)
    assert checkpoint.load(tmp_path / "broken" / "checkpoints" / "last.pt")["step"] == 3
    train(config, tmp_path / "broken", resume=True, progress=False)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "broken")
    kept = sorted(p.name for p in (tmp_path / "straight" / "checkpoints").glob("step-*.pt"))
    assert kept == ["step-000002.pt", "step-000004.pt", "step-000006.pt"]
    assert checkpoint.load(tmp_path / "straight" / "checkpoints" / "step-000004.pt")["step"] == 4
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(x)
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_settings_that_would_mix_two_runs(tmp_path, dataset_root):
    path = engine_config(tmp_path, dataset_root, {"name": "matching"}, train={"steps": 4})
    config = load_config(str(path))
    with pytest.raises(Interrupted):
        train(config, tmp_path / "run", progress=False, stop_at=2)
    rescaled = load_config(str(path), ["method.scale=20", "train.lr=0.01"])
    with pytest.raises(FewShotError, match=r"method.scale: None in the run, 20.0 now; train.lr: 0.001"):
        train(rescaled, tmp_path / "run", resume=True, progress=False)
    longer = load_config(str(path), ["train.steps=5", "train.log_every=1"])  # a constant rate: extendable
    assert train(longer, tmp_path / "run", resume=True, progress=False).steps == 5
    cosine = load_config(str(path), ["train.schedule=cosine"])
    with pytest.raises(Interrupted):
        train(cosine, tmp_path / "cosine", progress=False, stop_at=2)
    longer = load_config(str(path), ["train.schedule=cosine", "train.steps=8"])
    with pytest.raises(FewShotError, match="the cosine schedule spreads its rate over train.steps"):
        train(longer, tmp_path / "cosine", resume=True, progress=False)


def test_resuming_a_complete_run_trains_nothing_and_a_shorter_one_is_refused(tmp_path, dataset_root):
    path = engine_config(tmp_path, dataset_root, {"name": "protonet"}, train={"steps": 4})
    config = load_config(str(path))
    assert train(config, tmp_path / "run", progress=False).resumed_from == 0
    before = _weights(tmp_path / "run")
    again = train(config, tmp_path / "run", resume=True, progress=False)
    assert (again.resumed_from, again.steps) == (4, 4)
    after = _weights(tmp_path / "run")
    assert all(torch.equal(before[key], after[key]) for key in before)
    shorter = load_config(str(path), ["train.steps=3"])
    with pytest.raises(RunMismatch, match="trained to 4 steps, past the 3 asked for"):
        train(shorter, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(RunMismatch, match="is a protonet run, not matching"):
        train(load_config(str(path), ["method.name=matching"]), tmp_path / "run", resume=True, progress=False)


def test_training_differences_name_what_would_train_other_weights():
    five, twenty = load_config("protonet-omniglot-5w1s"), load_config("protonet-omniglot-20w1s")
    assert training_differences(five, twenty) == []  # Snell et al.: one model, tested at 5 and 20 ways
    neutral = load_config(
        "protonet-omniglot-5w1s", ["train.threads=1", "train.log_every=7", "eval.episodes=9"]
    )
    assert training_differences(five, neutral) == []
    checked = load_config("protonet-omniglot-5w1s", ["train.val_every=7", "train.steps=9"])
    assert [key for key, _, _ in training_differences(five, checked)] == ["train.steps", "train.val_every"]
    assert resume_conflicts(five, checked) == []  # a resume may change both
    matching = load_config("matching-omniglot-5w1s")
    assert ("method.name", "protonet", "matching") in training_differences(five, matching)


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing in the engine can catch it."""


@pytest.mark.parametrize("where", ["validate", "plot"], ids=["before-its-record", "after-its-record"])
def test_kill_during_validation_loses_no_steps(tmp_path, dataset_root, monkeypatch, where):
    path = engine_config(
        tmp_path, dataset_root, {"name": "protonet"}, train={"steps": 6, "checkpoint_every": 100}
    )
    config = load_config(str(path))
    train(config, tmp_path / "straight", progress=False)

    from fewshot.engine.train import Trainer

    original = getattr(Trainer, where)  # validate: the kill comes before the validation record and
    # best.pt are written; plot: after both (plot is the last thing a validation does)

    def killed_at_step_4(self):
        result = original(self)
        if self.step == 4:
            raise _Killed
        return result

    monkeypatch.setattr(Trainer, where, killed_at_step_4)
    with pytest.raises(_Killed):
        train(config, tmp_path / "broken", progress=False)
    state = checkpoint.load(tmp_path / "broken" / "checkpoints" / "last.pt")
    assert (state["step"], state["validation_pending"]) == (4, True)
    monkeypatch.setattr(Trainer, where, original)
    train(config, tmp_path / "broken", resume=True, progress=False)

    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "broken")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("last.pt", "best.pt"):
        s, t = (checkpoint.load(tmp_path / run / "checkpoints" / name) for run in ("straight", "broken"))
        assert (s["step"], s["best_val"], s["best_step"]) == (t["step"], t["best_val"], t["best_step"])
        assert not t["validation_pending"]

    def records(run: str) -> list[tuple[int, str]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], "val" if "val" in r else "loss") for r in map(json.loads, lines)]

    assert records("broken") == records("straight")
    assert records("straight").count((4, "val")) == 1


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path, dataset_root):
    path = engine_config(
        tmp_path,
        dataset_root,
        {"name": "protonet"},
        train={"steps": 100000, "checkpoint_every": 100000, "val_every": 100000},
    )
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fewshot", "train", str(path), "--run-dir", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGINT" in err and "--resume" in err and "Traceback" not in err
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["step"] >= 2


def test_non_finite_loss_stops_with_saved_state(tmp_path, dataset_root):
    path = engine_config(tmp_path, dataset_root, {"name": "protonet"})
    config = load_config(str(path))
    from fewshot.methods.protonet import PrototypicalNetwork

    original = PrototypicalNetwork.loss

    def poisoned(self, batch):
        loss, metrics = original(self, batch)
        return loss * float("nan"), metrics

    PrototypicalNetwork.loss = poisoned
    try:
        with pytest.raises(TrainingStopped, match="loss became nan in step 1"):
            train(config, tmp_path / "run", progress=False)
    finally:
        PrototypicalNetwork.loss = original
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 0


def test_confidence_interval_formula():
    values = torch.tensor([1.0, 0.8, 0.9, 0.7, 1.0, 0.6])
    mean, ci = mean_ci95(values)
    n = len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values.tolist()) / (n - 1))
    assert mean == pytest.approx(0.8333333)
    assert ci == pytest.approx(1.96 * sd / math.sqrt(n))


# --- configuration -----------------------------------------------------------------------------


def test_every_preset_is_valid_and_cites_its_source():
    names = preset_names()
    assert len(names) >= 35
    for name in names:
        config = load_config(name)
        assert config.name == name and config.published.source
    for required in ("maml", "fomaml", "reptile", "metasgd", "anil", "protonet", "matching", "relation"):
        for setting in ("5w1s", "5w5s", "20w1s", "20w5s"):
            assert f"{required}-omniglot-{setting}" in names


def test_unknown_key_suggests_the_nearest(capsys):
    with pytest.raises(ConfigError, match="unknown key 'train.stesp'; did you mean 'train.steps'"):
        load_config("protonet-omniglot-5w1s", ["train.stesp=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train.lr: .*got 'fast'"):
        load_config("protonet-omniglot-5w1s", ["train.lr=fast"])


def test_similarity_scale_reaches_the_method():
    from fewshot.methods.registry import build_method

    def scale(preset: str, *overrides: str) -> float:
        return float(build_method(load_config(preset, list(overrides)), (1, 28, 28)).scale)

    assert scale("protonet-omniglot-5w1s", "method.name=matching") == 1.0  # the paper's formula
    assert scale("matching-omniglot-5w1s") == 20.0  # the presets sharpen it
    assert scale("matching-omniglot-5w1s", "method.scale=1") == 1.0
    assert scale("protonet-omniglot-5w1s", "method.distance=cosine") == 10.0
    assert scale("protonet-omniglot-5w1s", "method.distance=cosine", "method.scale=4") == 4.0
    with pytest.raises(ConfigError, match="method.scale"):
        load_config("matching-omniglot-5w1s", ["method.scale=0"])


def test_reptile_inner_settings_reach_reptile_only():
    from fewshot.methods.registry import build_method

    overrides = ["method.inner_batch=25", "method.inner_optimizer=adam", "method.inner_batch_test=7"]
    method = build_method(load_config("reptile-omniglot-5w1s", overrides), (1, 28, 28))
    assert (method.inner_batch, method.inner_optimizer, method.inner_batch_test) == (25, "adam", 7)
    for setting in ("method.inner_optimizer=adam", "method.inner_batch_test=5"):
        with pytest.raises(
            ConfigError, match="method.inner_batch, method.inner_batch_test and method.inner_opt"
        ):
            load_config("maml-omniglot-5w1s", [setting])
    with pytest.raises(ConfigError, match="method.inner_batch"):
        load_config("reptile-omniglot-5w1s", ["method.inner_batch=0"])


def test_batchnorm_adaptation_setting_reaches_the_method():
    from fewshot.methods.registry import build_method

    for preset in (
        "maml-omniglot-5w1s",
        "fomaml-omniglot-5w1s",
        "metasgd-omniglot-5w1s",
        "reptile-omniglot-5w1s",
    ):
        every = build_method(load_config(preset, ["method.adapt_batchnorm=true"]), (1, 28, 28))
        fixed = build_method(load_config(preset, ["method.adapt_batchnorm=false"]), (1, 28, 28))
        assert len(fixed._adapt_names()) == len(every._adapt_names()) - 8, preset  # 4 x (weight, bias)
        assert fixed.describe()["adapt_batchnorm"] is False and every.describe()["adapt_batchnorm"] is True
        # The first-order presets leave batch norm out of the inner loop; the others adapt it.
        preset_value = build_method(load_config(preset), (1, 28, 28)).describe()["adapt_batchnorm"]
        assert preset_value is (not preset.startswith("fomaml")), preset
    # ANIL adapts its head alone: its record says batch norm is not adapted, whatever the setting.
    anil = build_method(load_config("anil-omniglot-5w1s", ["method.adapt_batchnorm=true"]), (1, 28, 28))
    assert anil.describe()["adapt_batchnorm"] is False
    with pytest.raises(ConfigError, match="adapt_batchnorm"):
        load_config("protonet-omniglot-5w1s", ["method.adapt_batchnorm=false"])


def test_unknown_preset_through_the_cli(capsys):
    assert main(["train", "protonet-omniglot-5w1"]) == 2
    err = capsys.readouterr().err
    assert "No preset named 'protonet-omniglot-5w1'" in err and "protonet-omniglot-5w1s" in err


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "maml-omniglot-5w1s" in out and "98.70%" in out and "Finn et al. 2017" in out


def test_ways_the_dataset_cannot_supply(tmp_path, dataset_root, capsys):
    path = engine_config(tmp_path, dataset_root, {"name": "protonet"}, train_episode={"ways": 9})
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "9-way episodes need 9 classes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_with_too_many_ways(tmp_path, dataset_root, capsys):
    path = engine_config(tmp_path, dataset_root, {"name": "protonet"})
    run = tmp_path / "run"
    assert main(["train", str(path), "--run-dir", str(run), "--no-eval"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--ways", "7"]) == 2
    assert "7-way episodes need 7 classes" in capsys.readouterr().err


# --- checkpoints and prediction inputs -----------------------------------------------------------


@pytest.fixture
def trained_run(tmp_path, dataset_root) -> Path:
    path = engine_config(tmp_path, dataset_root, {"name": "protonet"}, train={"steps": 2})
    run = tmp_path / "run"
    train(load_config(str(path)), run, progress=False)
    return run


def test_truncated_checkpoint(trained_run, tmp_path, capsys):
    ckpt = trained_run / "checkpoints" / "best.pt"
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpt.read_bytes()[:500])
    assert main(["eval", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.pt is truncated, corrupt or not a fewshot checkpoint" in err and "Traceback" not in err


def test_checkpoint_with_pickled_code_is_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "config": "", "payload": Evil()}, path)
    assert main(["eval", str(path)]) == 2
    assert not (tmp_path / "pwned").exists()


def test_resume_with_another_method_or_setting(trained_run, tmp_path, dataset_root, capsys):
    other = engine_config(tmp_path, dataset_root, {"name": "matching"})
    assert main(["train", str(other), "--run-dir", str(trained_run), "--resume"]) == 2
    assert "is a protonet run, not matching" in capsys.readouterr().err
    changed = engine_config(tmp_path, dataset_root, {"name": "protonet"}, train={"steps": 2, "lr": 0.5})
    assert main(["train", str(changed), "--run-dir", str(trained_run), "--resume"]) == 2
    assert "train.lr: 0.001 in the run, 0.5 now" in capsys.readouterr().err  # not resumed silently
    longer = engine_config(tmp_path, dataset_root, {"name": "protonet"}, train={"steps": 3})
    assert main(["train", str(longer), "--run-dir", str(trained_run), "--resume", "--no-eval"]) == 0
    assert checkpoint.load(trained_run / "checkpoints" / "last.pt")["step"] == 3


def test_checkpoint_from_another_method(trained_run, tmp_path, capsys):
    state = checkpoint.load(trained_run / "checkpoints" / "last.pt")
    config = yaml.safe_load(state["config"])
    config["method"]["name"] = "matching"
    config["method"]["fce"] = True
    state["config"] = yaml.safe_dump(config)
    checkpoint.save_atomic({k: v for k, v in state.items() if k != "format"}, tmp_path / "mixed.pt")
    assert main(["eval", str(tmp_path / "mixed.pt")]) == 2
    assert "do not fit a matching model" in capsys.readouterr().err


def test_new_run_refuses_to_overwrite(trained_run, tmp_path, dataset_root, capsys):
    path = engine_config(tmp_path, dataset_root, {"name": "protonet"})
    assert main(["train", str(path), "--run-dir", str(trained_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_support_folder_problems(trained_run, tmp_path, capsys):
    query = sorted((tmp_path / "tiny" / "test" / "s0").iterdir())[0]
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    assert main(["predict", str(trained_run), "--support", str(empty), "--query", str(query)]) == 2
    assert "class folder(s) 'a' (empty) hold no image file" in capsys.readouterr().err
    (empty / "a").rmdir()
    assert main(["predict", str(trained_run), "--support", str(empty), "--query", str(query)]) == 2
    assert "no class folders with images" in capsys.readouterr().err
    dropped = image_folder(tmp_path / "dropped", {"a": 2, "b": 2})
    (dropped / "c" / "nested").mkdir(parents=True)  # a class the predictor could never choose
    assert main(["predict", str(trained_run), "--support", str(dropped), "--query", str(query)]) == 2
    assert "'c' (nested/) hold no image file" in capsys.readouterr().err
    single = image_folder(tmp_path / "single", {"only": 3})
    assert main(["predict", str(trained_run), "--support", str(single), "--query", str(query)]) == 2
    assert "needs at least 2 classes" in capsys.readouterr().err


def test_query_folder_skips_hidden_files(trained_run, tmp_path, capsys):
    support = image_folder(tmp_path / "support", {"a": 2, "b": 2})
    queries = image_folder(tmp_path / "queries", {"shots": 2})
    (queries / "shots" / "._000.png").write_bytes(b"\0\5\26\7")  # macOS resource fork
    image_folder(queries / ".ipynb_checkpoints", {"old": 1})
    args = ["predict", str(trained_run), "--support", str(support), "--query", str(queries), "--json"]
    assert main(args) == 0
    paths = [json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()]
    assert [Path(p).relative_to(queries).as_posix() for p in paths] == ["shots/000.png", "shots/001.png"]


def test_query_that_is_not_an_image(trained_run, tmp_path, capsys):
    support = image_folder(tmp_path / "support", {"a": 2, "b": 2})
    bogus = tmp_path / "notes.png"
    bogus.write_text("hello")
    assert main(["predict", str(trained_run), "--support", str(support), "--query", str(bogus)]) == 2
    err = capsys.readouterr().err
    assert "Cannot read image" in err and "notes.png" in err


def test_dataloader_workers_train_the_same_weights(tmp_path, dataset_root):
    path = engine_config(tmp_path, dataset_root, {"name": "protonet"}, train={"steps": 3})
    train(load_config(str(path)), tmp_path / "main", progress=False)
    train(load_config(str(path), ["data.num_workers=2"]), tmp_path / "workers", progress=False)
    a, b = _weights(tmp_path / "main"), _weights(tmp_path / "workers")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- non-finite stops, run files, resumed settings, signals at the end ---------------------------


def _protonet_loss_with(monkeypatch, after_call: int, poison) -> None:
    """Make the ``after_call``-th Prototypical Networks loss (the step of that number) call ``poison``."""
    from fewshot.methods.protonet import PrototypicalNetwork

    original, calls = PrototypicalNetwork.loss, []

    def loss(self, batch):
        out = original(self, batch)
        calls.append(1)
        if len(calls) == after_call:
            poison(self)
        return out

    monkeypatch.setattr(PrototypicalNetwork, "loss", loss)


def test_non_finite_buffer_keeps_the_last_good_checkpoint_and_resumes_at_a_lower_rate(
    tmp_path, dataset_root, monkeypatch
):
    schedule = {"steps": 6, "val_every": 100, "checkpoint_every": 2, "schedule": "step", "step_size": 2}
    path = engine_config(tmp_path, dataset_root, {"name": "protonet"}, train=schedule)
    run = tmp_path / "run"

    def overflow_running_var(method) -> None:  # the loss stays finite: training uses batch statistics
        next(b for n, b in method.named_buffers() if n.endswith("running_var")).fill_(math.inf)

    _protonet_loss_with(monkeypatch, 3, overflow_running_var)
    with pytest.raises(TrainingStopped, match=r"buffer \S+running_var became non-finite in step 3") as stop:
        train(load_config(str(path)), run, progress=False)
    message = str(stop.value)
    assert "last good state (step 2)" in message
    assert f"fewshot train --run-dir {run} --resume --set train.lr=0.0001 --set train.grad_clip=1" in message
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert (state["step"], state["stopped"]) == (2, "non-finite")
    assert all(torch.isfinite(t).all() for t in state["method"].values() if t.is_floating_point())
    monkeypatch.undo()

    with pytest.raises(RunMismatch, match="method.scale: None in the run, 3.0 now"):  # only the cures
        train(load_config(str(path), ["train.lr=0.0001", "method.scale=3"]), run, resume=True, progress=False)
    cured = load_config(str(path), ["train.lr=0.0001", "train.grad_clip=1"])
    assert train(cured, run, resume=True, progress=False).steps == 6
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert "stopped" not in state
    assert state["resumed_changes"] == ["from step 2: train.grad_clip None -> 1.0, train.lr 0.001 -> 0.0001"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["lr"] for r in records if "loss" in r}
    assert rates[2] == pytest.approx(0.001 * 0.5)
    for step in (3, 4, 5, 6):  # the step schedule goes on from step 2 at the new base rate
        assert rates[step] == pytest.approx(0.0001 * 0.5 ** (step // 2)), step


def test_non_finite_gradient_norm_stops_before_the_optimiser_step(tmp_path, dataset_root, monkeypatch):
    path = engine_config(tmp_path, dataset_root, {"name": "protonet"}, train={"grad_clip": 5.0})

    def infinite_gradient(method) -> None:
        next(iter(method.parameters())).register_hook(lambda g: torch.full_like(g, math.inf))

    _protonet_loss_with(monkeypatch, 1, infinite_gradient)
    with pytest.raises(TrainingStopped, match=r"gradient norm became inf in step 1.*grad_clip=0.5"):
        train(load_config(str(path)), tmp_path / "run", progress=False)
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 0 and all(torch.isfinite(t).all() for t in state["method"].values())


def test_a_new_run_starts_its_metrics_anew(tmp_path, dataset_root):
    path = engine_config(tmp_path, dataset_root, {"name": "protonet"}, train={"steps": 2})
    run = tmp_path / "run"
    run.mkdir()  # a run that died before its first checkpoint left its records
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.5}\n{"step": 2, "loss": 9.5}\n')
    train(load_config(str(path)), run, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(r["loss"] != 9.5 for r in records if "loss" in r)


def test_resume_keeps_the_validation_task(tmp_path, dataset_root):
    base = load_config("protonet-omniglot-5w1s")
    for setting in ("eval.ways=20", "eval.shots=5", "eval.queries=5", "eval.seed=7"):
        conflicts = resume_conflicts(base, load_config("protonet-omniglot-5w1s", [setting]))
        assert [c.split(":")[0] for c in conflicts] == [setting.split("=")[0]]
    assert (
        resume_conflicts(base, load_config("protonet-omniglot-5w1s", ["eval.episodes=9", "eval.chunk=3"]))
        == []
    )

    path = engine_config(tmp_path, dataset_root, {"name": "protonet"})
    with pytest.raises(Interrupted):
        train(load_config(str(path)), tmp_path / "run", progress=False, stop_at=2)
    with pytest.raises(RunMismatch, match=r"eval.queries: 2 in the run, 1 now\. Resume with the run's own"):
        train(load_config(str(path), ["eval.queries=1"]), tmp_path / "run", resume=True, progress=False)
    neutral = load_config(str(path), ["eval.episodes=3", "eval.chunk=2"])
    assert train(neutral, tmp_path / "run", resume=True, progress=False).steps == 4


def test_test_evaluation_after_a_resume_uses_the_current_eval_settings(tmp_path, dataset_root, capsys):
    path = engine_config(tmp_path, dataset_root, {"name": "protonet"}, train={"steps": 2})
    run = tmp_path / "run"
    assert main(["train", str(path), "--run-dir", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text())["episodes"] == 6
    assert main(["train", "--run-dir", str(run), "--resume", "--set", "eval.episodes=5"]) == 0
    assert json.loads((run / "eval.json").read_text())["episodes"] == 5
    assert "test accuracy" in capsys.readouterr().out


def test_resume_skips_a_metrics_line_cut_short(tmp_path, dataset_root):
    from fewshot.engine.plots import learning_curve

    path = engine_config(tmp_path, dataset_root, {"name": "protonet"}, train={"checkpoint_every": 100})
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(load_config(str(path)), run, progress=False, stop_at=3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.')  # killed mid-write
    learning_curve(run / "metrics.jsonl", tmp_path / "curve.png")
    train(load_config(str(path)), run, resume=True, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_data_root_is_taken_as_given(tmp_path, dataset_root, monkeypatch):
    import fewshot.engine.train as engine

    seen = []

    def recorded(config, run_dir, resume=False):
        seen.append(config.data.data_root)
        raise FewShotError("recorded")

    monkeypatch.setattr(engine, "train", recorded)
    path = engine_config(tmp_path, dataset_root, {"name": "protonet"})
    roots = [f"{tmp_path}/my data #2", "2024", "null"]  # not a comment, a number or None
    for root in roots:
        assert main(["train", str(path), "--run-dir", str(tmp_path / "run"), "--data-root", root]) == 2
    assert seen == roots


def test_signal_in_the_last_step_says_training_is_complete(tmp_path, dataset_root, monkeypatch, capsys):
    from fewshot.engine.train import Trainer

    path = engine_config(tmp_path, dataset_root, {"name": "protonet"})
    run = tmp_path / "run"
    original = Trainer.validate

    def signalled_in_the_final_validation(self):
        if self.step == self.config.train.steps:
            signal.raise_signal(signal.SIGINT)
        return original(self)

    monkeypatch.setattr(Trainer, "validate", signalled_in_the_final_validation)
    assert main(["train", str(path), "--run-dir", str(run)]) == 130
    err = capsys.readouterr().err
    assert "Training is complete (4/4 steps" in err and "before the test evaluation" in err
    assert f"fewshot train --run-dir {run} --resume" in err and not (run / "eval.json").exists()
    monkeypatch.undo()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    assert (run / "eval.json").is_file()


def test_checkpoints_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = checkpoint.save_atomic({"config": "", "step": 0}, tmp_path / "checkpoints" / "last.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
