"""Shared fixtures: every test gets its own cache folder and no data root by default.

The real-data tier reads the data root that was in FEWSHOT_DATA when pytest
started (``real_data_root``) and is skipped when there is none.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_DATA = os.environ.get("FEWSHOT_DATA")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test writes its cache under tmp_path and sees no FEWSHOT_DATA."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEWSHOT_CACHE", str(cache))
    monkeypatch.delenv("FEWSHOT_DATA", raising=False)
    return cache


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory) -> Path:
    """One decoded cache for the whole real-data tier (decoding Omniglot takes seconds)."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture
def real_data_root(monkeypatch, real_cache) -> Path:
    """The real data root (FEWSHOT_DATA as given to pytest), or skip the test."""
    if not REAL_DATA or not (Path(REAL_DATA) / "omniglot").is_dir():
        pytest.skip("real-data tier: set FEWSHOT_DATA to a folder with omniglot/")
    monkeypatch.setenv("FEWSHOT_CACHE", str(real_cache))
    return Path(REAL_DATA)
