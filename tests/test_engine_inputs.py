"""Inputs the engine must refuse with a readable error, and outputs that must stay valid.

Covers evaluation counts and flags, predict on models that cannot take a support
folder, sinusoid evaluation and validation sizes, damaged checkpoints and JSON
results. Three tiny runs are trained once for the whole module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import engine_config, engine_dataset, image_folder

from fewshot.cli import main
from fewshot.config import from_dict
from fewshot.engine import checkpoint
from fewshot.engine.evaluate import EvalResult
from fewshot.engine.setup import build_experiment

pytestmark = pytest.mark.slow


SINE = {
    "name": "sine",
    "task": "sinusoid",
    "method": {"name": "maml", "backbone": "mlp", "inner_lr": 0.01, "inner_steps_test": 1},
    "train_episode": {"ways": 1, "shots": 5, "queries": 5},
    "train": {"steps": 2, "meta_batch": 4, "val_every": 2, "val_episodes": 25},
    "eval": {"episodes": 4, "shots": 3, "queries": 4},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Trained runs: protonet (one test episode), 3-way MAML, sinusoid MAML (eval.shots 3)."""
    tmp = tmp_path_factory.mktemp("runs")
    root = engine_dataset(tmp / "tiny")
    small = {"train": {"steps": 2, "val_every": 2, "checkpoint_every": 2}}
    configs = {
        "protonet": engine_config(tmp, root, {"name": "protonet"}, eval={"episodes": 1}, **small),
        "maml": engine_config(tmp, root, {"name": "maml", "inner_lr": 0.1, "inner_steps": 1}, **small),
        "sine": tmp / "sine.yaml",
    }
    configs["sine"].write_text(yaml.safe_dump(SINE))
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEWSHOT_CACHE", str(tmp / "cache"))
        for name, config in configs.items():
            out[name] = tmp / name
            assert main(["train", str(config), "--run-dir", str(out[name])]) == 0
    out["data"] = root
    return out


def refused(capsys, args: list[str]) -> str:
    """Run the CLI, expect a readable error (exit 2, no traceback) and return it."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewshot: error: ") and "Traceback" not in err
    return err


# --- evaluation counts and flags ----------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value",
    [("--episodes", "0"), ("--episodes", "-3"), ("--ways", "0"), ("--shots", "0"), ("--queries", "-1")],
)
def test_eval_refuses_counts_below_one(runs, capsys, flag, value):
    err = refused(capsys, ["eval", str(runs["protonet"]), flag, value])
    assert f"{flag} must be at least 1, got {value}" in err


def test_eval_of_a_fixed_head_at_other_ways(runs, capsys):
    err = refused(capsys, ["eval", str(runs["maml"]), "--ways", "2"])
    assert "trained for 3-way tasks" in err and "cannot handle 2-way tasks; use --ways 3" in err


# --- predict on models that cannot take the support folder --------------------------------------


@pytest.mark.parametrize("classes", [2, 4])
def test_predict_refuses_a_class_count_the_head_was_not_trained_for(runs, tmp_path, capsys, classes):
    support = image_folder(tmp_path / "support", {f"c{i}": 2 for i in range(classes)})
    query = support / "c0"
    err = refused(capsys, ["predict", str(runs["maml"]), "--support", str(support), "--query", str(query)])
    assert "trained for 3-way tasks" in err and f"the {classes} classes of support folder" in err
    assert "exactly 3 class folders" in err


def test_predict_refuses_a_sinusoid_checkpoint(runs, tmp_path, capsys):
    support = image_folder(tmp_path / "support", {"a": 2, "b": 2})
    err = refused(capsys, ["predict", str(runs["sine"]), "--support", str(support), "--query", str(support)])
    assert "trained on sinusoid tasks" in err and "predict is for image classification" in err


# --- sinusoid evaluation and validation ---------------------------------------------------------


def test_sinusoid_eval_uses_eval_shots(runs, capsys):
    assert main(["eval", str(runs["sine"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shots"] == 3 and result["queries"] == 4 and result["episodes"] == 4
    assert main(["eval", str(runs["sine"]), "--json", "--shots", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["shots"] == 2


@pytest.mark.parametrize("flag,value", [("--ways", "5"), ("--split", "val")])
def test_sinusoid_eval_refuses_ways_and_split(runs, capsys, flag, value):
    err = refused(capsys, ["eval", str(runs["sine"]), flag, value])
    assert f"{flag} does not apply to this sinusoid-regression run" in err


@pytest.mark.parametrize("val_episodes", [10, 25, 60])
def test_sinusoid_validation_scores_exactly_val_episodes_tasks(val_episodes):
    config = from_dict({**SINE, "train": {**SINE["train"], "val_episodes": val_episodes}})
    exp = build_experiment(config, progress=False)
    errors = []
    for i in range(math.ceil(val_episodes / exp.val_sampler.tasks)):  # the same tasks, in order
        batch = exp.val_sampler[i]
        with torch.no_grad():
            pred = exp.method.eval().query_logits(batch)
        errors.append(((pred - batch.query_labels) ** 2).mean(dim=(1, 2)))
    expected = -float(torch.cat(errors)[:val_episodes].mean())
    assert math.isclose(exp.validate(exp.method.train()), expected, rel_tol=1e-5)


# --- damaged checkpoints ------------------------------------------------------------------------


def altered(run: Path, out: Path, **changes) -> Path:
    """A copy of ``run``'s last checkpoint with keys changed (None deletes the key)."""
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    state.pop("format")
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    return checkpoint.save_atomic(state, out)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"config": "name: [unclosed\n"}, "is not valid YAML"),
        ({"config": "- a\n- b\n"}, "is a list, not a mapping of settings"),
        ({"method": None}, "lacks method,"),
        ({"preprocess": None}, "lacks preprocess (image size and channels)"),
        ({"method_name": "matching"}, "is labelled a matching checkpoint but its config describes protonet"),
    ],
    ids=["yaml-error", "list-config", "no-method", "no-preprocess", "name-mismatch"],
)
def test_damaged_checkpoint_is_refused_by_name(runs, tmp_path, capsys, changes, message):
    path = altered(runs["protonet"], tmp_path / "damaged.pt", **changes)
    err = refused(capsys, ["eval", str(path), "--episodes", "2"])
    assert message in err and str(path) in err


# --- JSON results -------------------------------------------------------------------------------


def strict_json(text: str) -> dict:
    """Parse as standard JSON: NaN and Infinity are not JSON, though Python reads them."""

    def reject(token: str) -> None:
        raise ValueError(f"invalid JSON token {token}")

    return json.loads(text, parse_constant=reject)


def test_one_episode_interval_is_null_in_json(runs, capsys):
    assert strict_json((runs["protonet"] / "eval.json").read_text())["ci95"] is None
    assert main(["eval", str(runs["protonet"]), "--json", "--episodes", "1"]) == 0
    result = strict_json(capsys.readouterr().out)
    assert result["ci95"] is None and 0.0 <= result["accuracy"] <= 1.0
    assert main(["eval", str(runs["protonet"]), "--episodes", "1"]) == 0
    line = capsys.readouterr().out
    assert "± n/a (95% CI, 1 episodes" in line and "nan" not in line


def test_eval_result_dict_has_no_nan():
    result = EvalResult(math.nan, math.inf, 1, 3, 1, 2, "test", "x", 0, "m", "n/a", {"lr": [math.nan, 0.5]})
    assert json.dumps(result.to_dict(), allow_nan=False)
    assert result.to_dict()["details"] == {"lr": [None, 0.5]}
