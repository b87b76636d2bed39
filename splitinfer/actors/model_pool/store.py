"""The model pool's storage: a directory per deployment (manifest.json + part files), `plans.json` for a model
deployment, and `sources/<sha256>.keras` for uploaded source models. Pure: files only, no broker.

Uploads arrive in chunks: count = ceil(size / chunk_bytes), every chunk ceil(size / count) bytes but the last; a
file is kept once all its chunks arrived and the whole file's sha256 matches, a manifest only once every part file
it names is there with the manifest's sha256, a plan table only once every plan's deployment is there.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from splitinfer.messages import MessageError, PlanTableMessage, plan_deployment_name
from splitinfer.splitter.manifest import MANIFEST_FILE, Manifest, file_sha256

PLANS_FILE = "plans.json"
SOURCES = "sources"  # reserved deployment id: uploaded source models, stored as <sha256>.keras
_SAFE = re.compile(r"^[A-Za-z0-9_.@:+-]{1,200}$")
def safe_name(name: str, what: str) -> str:
    if not _SAFE.match(name) or name in (".", "..") or name.startswith("."):
        raise MessageError(f"unsafe {what} name {name!r}", "bad_name")
    return name


def source_sha(file: str) -> str:
    """The sha256 a source file is named by (`<sha256>.keras`), or MessageError."""
    stem = file[:-len(".keras")] if file.endswith(".keras") else ""
    if not re.fullmatch(r"[0-9a-f]{64}", stem):
        raise MessageError(f"{file!r} is not a source name (<sha256>.keras)", "bad_name")
    return stem


def chunk_layout(size: int, chunk_bytes: int) -> tuple[int, int]:
    """(count, chunk_len) for a file of `size` bytes."""
    count = max(1, math.ceil(size / chunk_bytes))
    return count, max(1, math.ceil(size / count))


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(3).hex()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def parse_manifest(text: str | bytes) -> Manifest:
    """A manifest as the pool accepts it: valid, with plain file names and well-formed hashes."""
    try:
        manifest = Manifest.model_validate_json(text)
    except (ValidationError, ValueError) as exc:
        raise MessageError(f"invalid manifest: {str(exc).splitlines()[0][:200]}", "bad_manifest") from None
    if not manifest.parts:
        raise MessageError("invalid manifest: it lists no parts", "bad_manifest")
    for p in manifest.parts:
        for f in p.files():
            safe_name(f.file, "file")
            if not re.fullmatch(r"[0-9a-f]{64}", f.sha256):
                raise MessageError(f"invalid manifest: part {p.name} has no sha256 for {f.file}", "bad_manifest")
    return manifest


@dataclass
class _Upload:
    sha256: str
    count: int
    tmp: Path
    got: set[int] = field(default_factory=set)


class PoolStore:
    def __init__(self, root: Path, chunk_bytes: int):
        self.root = Path(root)
        self.chunk_bytes = chunk_bytes
        self._uploads: dict[tuple[str, str], _Upload] = {}
        self._lock = threading.Lock()  # chunks of one file arrive at once, each stored from a thread of its own

    def directory(self, deployment: str) -> Path:
        return self.root / safe_name(deployment, "deployment")

    def deployments(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST_FILE).exists()) if self.root.exists() else []

    def models(self) -> list[str]:
        """Model deployments: a plan table whose plans are deployments of their own (`<model>:<plan>`)."""
        return sorted(p.name for p in self.root.iterdir() if (p / PLANS_FILE).exists()) if self.root.exists() else []

    # ------------------------------------------------------------------ reading
    def manifest_text(self, deployment: str) -> str:
        path = self.directory(deployment) / MANIFEST_FILE
        if not path.exists():
            raise MessageError(f"no deployment {deployment!r} in the pool", "unknown_deployment")
        return path.read_text()

    def plans(self, model: str) -> PlanTableMessage:
        path = self.directory(model) / PLANS_FILE
        if not path.exists():
            raise MessageError(f"no model deployment {model!r} in the pool", "unknown_deployment")
        return PlanTableMessage.model_validate_json(path.read_text())

    def file_to_serve(self, deployment: str, file: str) -> tuple[Path, str]:
        """(path, sha256) of a file the pool may hand out: a source, or a part file its manifest names."""
        if deployment == SOURCES:
            sha = source_sha(file)
        else:
            entry = next((f for p in parse_manifest(self.manifest_text(deployment)).parts for f in p.files()
                          if f.file == file), None)
            if entry is None:
                raise MessageError(f"{file!r} is not a part file of {deployment!r}", "unknown_file")
            sha = entry.sha256
        path = self.directory(deployment) / safe_name(file, "file")
        if not path.exists():
            raise MessageError(f"no file {file!r} in {deployment!r}", "unknown_file")
        return path, sha

    def read_chunk(self, path: Path, index: int) -> tuple[bytes, int, int]:
        """(data, count, size) of chunk `index` of a stored file."""
        size = path.stat().st_size
        count, clen = chunk_layout(size, self.chunk_bytes)
        if index >= count:
            raise MessageError(f"chunk {index} out of range (file has {count})", "bad_chunk")
        with open(path, "rb") as f:
            f.seek(index * clen)
            return f.read(clen), count, size

    # ------------------------------------------------------------------ writing
    def receive_chunk(self, deployment: str, file: str, index: int, count: int, size: int, sha256: str,
                      data: bytes) -> bool:
        """Store one chunk; True once the whole file is in place (its sha256 checked)."""
        with self._lock:
            return self._receive_chunk(deployment, file, index, count, size, sha256, data)

    def _receive_chunk(self, deployment: str, file: str, index: int, count: int, size: int, sha256: str,
                       data: bytes) -> bool:
        d = self.directory(deployment)
        name = safe_name(file, "file")
        if deployment == SOURCES and source_sha(name) != sha256:
            raise MessageError(f"a source is uploaded as <its sha256>.keras, not {name!r}", "bad_name")
        mine, clen = chunk_layout(size, self.chunk_bytes)
        if count != mine or index >= mine:
            # the sender's chunk size may differ from ours: accept its layout if self-consistent
            clen = math.ceil(size / count) if count else 0
            if index >= count:
                raise MessageError(f"chunk {index} of {count}", "bad_chunk")
        expect_len = clen if index < count - 1 else size - clen * (count - 1)
        if len(data) != expect_len:
            raise MessageError(f"chunk {index} has {len(data)} bytes, expected {expect_len}", "bad_chunk")
        key = (deployment, name)
        up = self._uploads.get(key)
        if up is None or up.sha256 != sha256 or up.count != count:
            d.mkdir(parents=True, exist_ok=True)
            up = self._uploads[key] = _Upload(sha256, count, d / f".{name}.upload")
            with open(up.tmp, "wb") as f:
                f.truncate(size)
        with open(up.tmp, "r+b") as f:
            f.seek(index * clen)
            f.write(data)
        up.got.add(index)
        if len(up.got) < count:
            return False
        del self._uploads[key]
        if file_sha256(up.tmp) != sha256:
            up.tmp.unlink(missing_ok=True)
            raise MessageError(f"{name}: sha256 mismatch after upload", "bad_chunk")
        os.replace(up.tmp, d / name)
        return True

    def store_manifest(self, deployment: str, text: str) -> int:
        """Keep a deployment's manifest once its part files are all here; returns how many parts it has."""
        if deployment == SOURCES:
            raise MessageError(f"{SOURCES!r} is reserved for source models", "bad_name")
        manifest = parse_manifest(text)
        d = self.directory(deployment)
        for f in (f for p in manifest.parts for f in p.files()):
            path = d / f.file
            if not path.exists():
                raise MessageError(f"part file {f.file} not uploaded", "missing_file")
            if file_sha256(path) != f.sha256:
                raise MessageError(f"part file {f.file} does not match the manifest's sha256", "bad_file")
        atomic_write(d / MANIFEST_FILE, text.encode())
        return len(manifest.parts)

    def store_plans(self, msg: PlanTableMessage) -> list[str]:
        """Keep a model's plan table once every plan's deployment is here; returns the plan ids."""
        try:
            plans = [str(p["id"]) for p in msg.table["plans"]]
        except (KeyError, TypeError):
            raise MessageError("invalid plan table: needs table.plans with ids", "bad_plans") from None
        missing = [p for p in plans if not (self.directory(plan_deployment_name(msg.name, p)) / MANIFEST_FILE).exists()]
        if missing:
            raise MessageError(f"plan deployment {plan_deployment_name(msg.name, missing[0])} is not in the pool",
                               "missing_plan")
        d = self.directory(msg.name)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / PLANS_FILE, msg.model_dump_json().encode())
        return plans

    def delete(self, deployment: str) -> list[str]:
        """Forget a deployment; for a model, its plan table and every plan deployment `<model>:<plan>` too.
        Returns what was deleted."""
        if deployment == SOURCES:
            raise MessageError("the sources are not a deployment", "bad_name")
        d = self.directory(deployment)
        doomed = [d]
        if (d / PLANS_FILE).exists():
            doomed += [p for p in self.root.iterdir() if p.name.startswith(plan_deployment_name(deployment, ""))]
        gone = [p.name for p in doomed if p.exists()]
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
        return gone
