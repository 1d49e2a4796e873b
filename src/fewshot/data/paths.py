"""Where data is read from and where derived files are written.

The data root (read-only is fine) comes from an explicit setting, else the
``FEWSHOT_DATA`` environment variable. Everything this library writes
(downloads, decoded stores) goes under the cache folder: ``FEWSHOT_CACHE``,
else ``$XDG_CACHE_HOME/fewshot``, else ``~/.cache/fewshot``.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "FEWSHOT_DATA"
CACHE_ENV = "FEWSHOT_CACHE"


def data_root(setting: str | os.PathLike | None = None) -> Path | None:
    """The data root from the setting, else $FEWSHOT_DATA, else None (not configured)."""
    value = setting if setting is not None else os.environ.get(DATA_ENV)
    if value in (None, ""):
        return None
    return Path(value).expanduser()


def cache_root(setting: str | os.PathLike | None = None) -> Path:
    """The folder for downloads and decoded stores (created on demand)."""
    value = setting if setting is not None else os.environ.get(CACHE_ENV)
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "fewshot"


def ways_to_supply(dataset: str, looked: list[Path]) -> str:
    """The part of a 'data not found' message that says where we looked and what to do."""
    places = "\n".join(f"  - {p}" for p in looked) or "  - (no data root configured)"
    return (
        f"Looked for {dataset} in:\n{places}\n"
        "Supply it in one of three ways:\n"
        "  1. pass a data root (--data-root DIR on the command line, data_root=... in Python),\n"
        f"  2. set the environment variable {DATA_ENV}=DIR,\n"
        "  3. let it download (needs internet; Omniglot only), e.g. `fewshot datasets prepare omniglot`."
    )
