"""The ``fewshot datasets`` commands, end to end through the CLI entry point."""

from __future__ import annotations

import subprocess
import sys

from fixtures import image_folder, omniglot_root
from PIL import Image

from fewshot.cli import main


def test_list(capsys):
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    assert "omniglot" in out and "miniimagenet" in out and "folder:DIR" in out


def test_prepare_verify_show_on_fixture(tmp_path, capsys):
    root = omniglot_root(tmp_path / "data")
    assert main(["datasets", "prepare", "omniglot", "--data-root", str(root), "--no-download"]) != 0
    err = capsys.readouterr().err  # the packaged Vinyals split names characters the fixture lacks
    assert "does not have" in err and "Traceback" not in err
    out_png = tmp_path / "ep.png"
    assert (
        main(
            [
                "datasets",
                "show",
                "omniglot",
                "--split",
                "background",
                "--data-root",
                str(root),
                "--ways",
                "3",
                "--shots",
                "2",
                "--queries",
                "1",
                "--out",
                str(out_png),
            ]
        )
        == 0
    )
    image = Image.open(out_png)
    assert image.size[0] > 200 and image.size[1] > 200


def test_verify_reports_wrong_counts(tmp_path, capsys):
    root = omniglot_root(tmp_path / "data")
    assert main(["datasets", "verify", "omniglot", "--data-root", str(root), "--no-download"]) == 2
    err = capsys.readouterr().err
    assert "7 characters, expected 1623" in err


def test_folder_prepare_and_show(tmp_path, capsys):
    root = image_folder(tmp_path / "mine", {"ok": 4, "ng": 4})
    assert main(["datasets", "prepare", f"folder:{root}", "--image-size", "16"]) == 0
    assert "2 classes, 8 images" in capsys.readouterr().out
    assert main(["datasets", "verify", f"folder:{root}", "--image-size", "16"]) == 0
    assert (
        main(
            [
                "datasets",
                "show",
                f"folder:{root}",
                "--image-size",
                "16",
                "--ways",
                "2",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 0
    )


def test_errors_are_one_line_and_nonzero_without_traceback(tmp_path):
    env_cmd = [
        sys.executable,
        "-m",
        "fewshot",
        "datasets",
        "show",
        "omniglot",
        "--data-root",
        str(tmp_path),
        "--no-download",
    ]
    result = subprocess.run(env_cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("fewshot: error: Omniglot archive")
    assert "Traceback" not in result.stderr
    root = image_folder(tmp_path / "mine", {"a": 2, "b": 2})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fewshot",
            "datasets",
            "show",
            str(root),
            "--ways",
            "5",
            "--out",
            str(tmp_path / "y.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "5-way episodes need 5 classes" in result.stderr
