"""The malloc settings the fewshot command re-executes itself with (fewshot.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fewshot.allocator import MARKER, OPT_OUT, TUNABLES, malloc_mode, tuned_environment


def test_tuned_environment_adds_the_thresholds_once_and_keeps_other_tunables():
    env = tuned_environment({"PATH": "/bin"}, glibc=True)
    assert env is not None
    assert env["GLIBC_TUNABLES"] == TUNABLES and env[MARKER] == "1" and env["PATH"] == "/bin"
    assert malloc_mode(env) == "tuned"
    assert tuned_environment(env, glibc=True) is None  # the re-executed process stops there

    other = tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, glibc=True)
    assert other is not None
    assert other["GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=0:{TUNABLES}"


def test_tuned_environment_leaves_a_users_choice_and_other_systems_alone():
    user = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}
    assert tuned_environment(user, glibc=True) is None
    assert malloc_mode(user) == "user"
    assert tuned_environment({OPT_OUT: "system"}, glibc=True) is None
    assert tuned_environment({}, glibc=False) is None
    assert malloc_mode({}) == "system"


def _run(code: str, **extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in (MARKER, OPT_OUT, "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(tuned_environment({}) is None, reason="malloc tuning applies to Linux with glibc only")
def test_tune_malloc_reexecutes_the_same_command_with_the_settings():
    code = (
        "import os, sys; print('start', sys.argv[1:], flush=True); "
        "from fewshot.allocator import tune_malloc, malloc_mode; tune_malloc(); "
        "print(malloc_mode(), os.environ.get('GLIBC_TUNABLES'))"
    )
    lines = _run(code).splitlines()
    # the code before tune_malloc ran twice (once per process image), the rest once, tuned
    assert lines == ["start []", "start []", f"tuned {TUNABLES}"]
    assert _run(code, **{OPT_OUT: "system"}).splitlines()[-1].startswith("system")
    interactive = "import sys; sys.ps1 = '>>> '; " + code  # a session a re-execution would restart
    assert _run(interactive).splitlines() == ["start []", "system None"]
