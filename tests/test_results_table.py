"""benchmarks/results_table.py: the committed table is the committed rows'; bad input gets a clear error."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "results_table.py"


def run_table(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO)


def test_docs_table_matches_the_committed_rows(tmp_path):
    """Regenerating docs/results.md's table from docs/results/*/row.json changes nothing."""
    copy = tmp_path / "results.md"
    shutil.copy(REPO / "docs" / "results.md", copy)
    done = run_table("--runs", str(REPO / "docs" / "results"), "--write", str(copy))
    assert done.returncode == 0, done.stderr
    assert copy.read_text() == (REPO / "docs" / "results.md").read_text()


def test_write_into_a_missing_file_names_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nothing.md"
    done = run_table("--runs", str(REPO / "docs" / "results"), "--write", str(missing))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert str(missing) in done.stderr and "results-table" in done.stderr
    assert not missing.exists()


def test_write_into_a_file_without_markers_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# no table markers here\n")
    done = run_table("--runs", str(REPO / "docs" / "results"), "--write", str(page))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "results-table" in done.stderr
    assert page.read_text() == "# no table markers here\n"
