"""Where profiles and calibrations are cached on disk, and writing them atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from splitinfer.monitor.profile import PROFILE_VERSION


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from splitinfer.settings import get_settings

    return Path(get_settings().cache_dir)


def profile_path(model_hash: str, input_shapes: list[list[int]], batch: int, fingerprint: str,
                 cache_dir: Path | None = None) -> Path:
    """profiles/<model hash>-<shape>-b<batch>-<machine>-v<version>.json under the cache directory."""
    shape = "_".join("x".join(str(d) for d in s) for s in input_shapes) or "scalar"
    if len(shape) > 60:
        shape = hashlib.sha256(shape.encode()).hexdigest()[:16]
    name = f"{model_hash[:24]}-{shape}-b{batch}-{fingerprint}-v{PROFILE_VERSION}.json"
    return cache_root(cache_dir) / "profiles" / name


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
