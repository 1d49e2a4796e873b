"""benchmarks/reproduce.py: rows are tested and recorded with their own settings; bad input is refused early.

Runs ``main()`` in-process (no re-execution for malloc) on a tiny folder dataset, a few steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import image_folder

from fewshot.data.episodes import Episode
from fewshot.data.render import render_episode
from fewshot.errors import FewShotError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import reproduce  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Enough classes for 20-way 1-shot 1-query test episodes and 5-way validation, 8x8 images."""
    root = tmp_path_factory.mktemp("ds")
    image_folder(root / "train", {f"t{i}": 3 for i in range(6)}, size=8)
    image_folder(root / "val", {f"v{i}": 2 for i in range(5)}, size=8)
    image_folder(root / "test", {f"s{i:02d}": 2 for i in range(20)}, size=8)
    return root


def tiny(dataset: Path) -> list[str]:
    """Overrides that make a protonet Omniglot preset a seconds-long run on ``dataset``."""
    sets = [
        f"data.dataset=folder:{dataset}",
        "train_episode.ways=3",
        "train_episode.queries=1",
        "eval.queries=1",
        "train.val_every=2",
        "train.val_episodes=1",
        "train.checkpoint_every=1",
        "train.log_every=1",
    ]
    return [arg for s in sets for arg in ("--set", s)]


def run(monkeypatch, tmp_path: Path, *args: str) -> None:
    """``reproduce.py ARGS`` in this process, with its cache under ``tmp_path``."""
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(reproduce, "tune_malloc", lambda: None)
    monkeypatch.setattr(sys, "argv", ["reproduce.py", *args])
    reproduce.main()


def refused(monkeypatch, tmp_path: Path, capsys, *args: str) -> str:
    """The error message of a refused command (argparse's or sys.exit's)."""
    with pytest.raises(SystemExit) as stop:
        run(monkeypatch, tmp_path, *args)
    assert stop.value.code not in (0, None)
    return stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err


def test_trained_by_curve_is_the_rows_own_and_a_rerun_keeps_the_training_machine(
    monkeypatch, tmp_path, dataset, capsys
):
    runs = tmp_path / "runs"
    args = ["protonet", "omniglot-20w1s", "--trained-by", "protonet-omniglot-5w1s", "--runs", str(runs)]
    args += ["--steps", "2", "--keep-every", "1", "--episodes", "1", "--curve", "--curve-episodes", "1"]
    run(monkeypatch, tmp_path, *args, *tiny(dataset))
    trainer, row_dir = runs / "protonet-omniglot-5w1s", runs / "protonet-omniglot-20w1s"
    assert not (trainer / "curve.json").exists() and not (trainer / "time_to_accuracy.png").exists()
    assert (row_dir / "time_to_accuracy.png").is_file()
    row = json.loads((row_dir / "row.json").read_text())
    assert json.loads((row_dir / "curve.json").read_text()) == row["curve"]
    assert [p["step"] for p in row["curve"]] == [1, 2]
    assert row["ways"] == 20 and row["ci95"] is None  # one episode: no interval, and no NaN in the JSON
    assert row["meets_published"] is None and "data.dataset" in row["not_comparable"]

    # A rerun trains nothing: the row keeps the machine and wall time of the invocation that trained.
    record = json.loads((trainer / reproduce.TRAINED_ON).read_text())
    assert record["steps"] == 2
    record.update(machine="the training machine", command_wall_min=12.3)
    (trainer / reproduce.TRAINED_ON).write_text(json.dumps(record))
    run(monkeypatch, tmp_path, *args, *tiny(dataset))
    rerun = json.loads((row_dir / "row.json").read_text())
    assert (rerun["machine"], rerun["command_wall_min"]) == ("the training machine", 12.3)

    table = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "results_table.py"), "--runs", str(runs)],
        capture_output=True,
        text=True,
    )
    assert table.returncode == 0, table.stderr
    line = next(x for x in table.stdout.splitlines() if x.startswith("| protonet | 20-way"))
    assert "± n/a" in line and "not comparable (settings differ)" in line and "--steps 2 " in line


def test_curve_tests_each_checkpoint_with_the_rows_episodes(monkeypatch, tmp_path):
    """Not with the checkpoint's own config: a --trained-by row tests other ways than its trainer."""
    asked = []

    class Result:
        accuracy, ci95 = 0.5, 0.1

    monkeypatch.setattr(reproduce, "load_run", lambda path: path)
    monkeypatch.setattr(reproduce.checkpoint, "load", lambda path: {"step": 3, "elapsed": 60.0})
    monkeypatch.setattr(reproduce, "evaluate_run", lambda run, **kw: asked.append(kw) or Result())
    config = reproduce.load_config("protonet-omniglot-20w5s", ["eval.queries=7", "eval.seed=5"])
    points = reproduce.curve({3: tmp_path / "step-000003.pt"}, 9, config)
    assert asked == [{"episodes": 9, "ways": 20, "shots": 5, "queries": 7, "seed": 5}]
    assert points == [{"step": 3, "train_s": 60.0, "accuracy": 0.5, "ci95": 0.1}]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["maml", "omniglot-5w1s", "--steps", "0"], "at least 1"),
        (["maml", "omniglot-5w1s", "--keep-every", "0"], "at least 1"),
        (["maml", "omniglot-5w1s", "--curve", "--curve-steps", "2,,4"], "separated by commas"),
        (["maml", "omniglot-5w1s", "--curve-steps", "2"], "add --curve"),
        (["maml", "omniglot-5w2s"], "omniglot-5w2s"),
        (["maml", "omniglot-5w1s", "--trained-by", "maml-nope"], "maml-nope"),
        (["maml", "omniglot-5w1s", "--set", "train.nope=3"], "nope"),
        (["maml", "sinusoid"], "benchmarks/sinusoid.py"),
        (["maml", "omniglot-5w1s", "--curve"], "add --keep-every"),
        (["maml", "omniglot-5w1s", "--curve", "--keep-every", "2", "--curve-steps", "3"], "--curve-steps 3"),
        (
            ["maml", "omniglot-5w1s", "--steps", "4", "--curve", "--keep-every", "2", "--curve-steps", "6"],
            "6",
        ),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(monkeypatch, tmp_path, capsys, args, message):
    runs = tmp_path / "runs"
    error = refused(monkeypatch, tmp_path, capsys, *args, "--runs", str(runs))
    assert message in error and "Traceback" not in error
    assert not runs.exists()  # refused before training: nothing written


def test_plot_curves_names_a_missing_row_and_labels_the_rows_episodes(tmp_path):
    import plot_curves

    missing = tmp_path / "nothing" / "row.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "plot_curves.py"),
            str(missing),
            "--out",
            str(tmp_path / "p.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr and str(missing) in done.stderr
    assert plot_curves.accuracy_label([{"ways": 20, "shots": 5}] * 2) == "20-way 5-shot test accuracy (%)"
    assert (
        plot_curves.accuracy_label([{"ways": 20, "shots": 5}, {"ways": 5, "shots": 5}]) == "test accuracy (%)"
    )


def test_results_table_command_restates_steps_above_the_preset():
    import results_table

    row = {"preset": "matching-omniglot-5w1s", "steps": 40000, "preset_steps": 20000, "schedule_cut": False}
    assert "--steps 40000" in results_table.command({**row, "episodes": 1000})


def episode() -> Episode:
    return Episode(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))


def test_render_writes_the_png_it_reports(tmp_path):
    written = render_episode(episode(), tmp_path / "noext")
    assert written == tmp_path / "noext.png" and written.read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "noext").exists()
    assert render_episode(episode(), tmp_path / "e.png") == tmp_path / "e.png"


@pytest.mark.parametrize("name", ["x.txt", "folder"])
def test_render_refuses_a_directory_or_another_format(tmp_path, name):
    (tmp_path / "folder").mkdir()
    with pytest.raises(FewShotError, match="PNG|directory"):
        render_episode(episode(), tmp_path / name)
    assert not (tmp_path / "x.txt").exists() and list((tmp_path / "folder").iterdir()) == []
