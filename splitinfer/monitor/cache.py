"""Where cached documents live on disk (the cache directory, a machine's calibration), and writing them atomically.
Profiles name their own files under it (profile.profile_path)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from splitinfer.config import get_settings


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(get_settings().cache_dir)


def calibration_path(fingerprint: str, cache_dir: Path | None = None) -> Path:
    return cache_root(cache_dir) / "calibration" / f"{fingerprint}.json"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
