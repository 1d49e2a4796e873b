"""Downloads that cannot silently fail: atomic writes and a checked MD5.

The fetch function is injectable so that the download path is tested offline.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fewshot.errors import CorruptDataError, DataNotFoundError

Fetch = Callable[[str], BinaryIO]
"""Opens a URL for reading: ``urllib.request.urlopen`` by default."""


def _urlopen(url: str) -> BinaryIO:
    return urllib.request.urlopen(url, timeout=60)


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str | None, fetch: Fetch | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically and check its MD5.

    The file appears at ``dest`` only when complete and verified; a failed or
    corrupt download leaves nothing behind and raises with the URL and reason.
    """
    fetch = fetch or _urlopen
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with fetch(url) as response:
                    shutil.copyfileobj(response, out)
            except OSError as exc:  # URLError, HTTPError and socket errors are OSErrors
                raise DataNotFoundError(f"Download of {url} failed: {exc}") from exc
        if md5 is not None:
            got = md5sum(tmp)
            if got != md5:
                raise CorruptDataError(
                    f"Download of {url} is corrupt: MD5 {got}, expected {md5}. "
                    "Nothing was kept; try again, or place the file in the data root by hand."
                )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
