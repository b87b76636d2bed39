"""Model pool: stores deployments (manifest + part files) and serves them over the broker, so no shared disk.

Protocol (RPC on `<ns>.control`, replies to the caller's reply_to):
- key `pool.upload`: PartChunk(deployment, file, index, count, size, sha256, data) -> Reply; the file is kept
  once all `count` chunks arrived and the whole file's sha256 matches; then PoolManifest(deployment, manifest)
  -> Reply: the manifest is accepted only if every part file it names is present with the manifest's sha256.
- key `pool.request`: PartRequest(deployment, "manifest.json") -> PoolManifest; PartRequest(deployment, file,
  index) -> PartChunk (only files the manifest names); PartRequest(model, "plans.json") -> PlanTableMessage;
  ListDeployments -> Reply(data={"deployments": [...], "models": [...]}).
- key `pool.upload`, also: PlanTableMessage(name, table) stores a model deployment's plan table (the optimizer;
  its plans are deployments `<name>:<plan>`, uploaded first);
  DeleteDeployment(d) forgets a deployment or a model with its plans (a deploy that failed half way).
- Sources: a .keras file uploaded as deployment `sources`, file `<sha256>.keras` (checked), so that the optimizer
  on another machine can fetch a user's model; served by the same name, never listed as a deployment.
Chunks: count = ceil(size / settings.pool_chunk_bytes), every chunk ceil(size / count) bytes but the last.

Helpers for other actors / the CLI: `upload_split`, `fetch_deployment`, `send_load_orders`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import re
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.base import Actor, run_actor
from splitinfer.actors.topology import Names, declare_control_queue
from splitinfer.planner.optimize import plan_deployment_name
from splitinfer.messages import (
    ListDeployments,
    LoadPart,
    Message,
    MessageError,
    PartChunk,
    DeleteDeployment,
    PartRequest,
    PlanTableMessage,
    PoolManifest,
    Reply,
    UnloadPart,
)
from splitinfer.settings import Settings

MANIFEST = "manifest.json"
PLANS = "plans.json"
SOURCES = "sources"  # reserved deployment id: uploaded source models, stored as <sha256>.keras
_SAFE = re.compile(r"^[A-Za-z0-9_.@:+-]{1,200}$")


class PoolError(RuntimeError):
    pass


def _safe_name(name: str, what: str) -> str:
    if not _SAFE.match(name) or name in (".", "..") or name.startswith("."):
        raise MessageError(f"unsafe {what} name {name!r}", "bad_name")
    return name


def chunk_layout(size: int, chunk_bytes: int) -> tuple[int, int]:
    """(count, chunk_len) for a file of `size` bytes."""
    count = max(1, math.ceil(size / chunk_bytes))
    return count, max(1, math.ceil(size / count))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(3).hex()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ModelPool(Actor):
    kind = "model_pool"

    def __init__(self, actor_id: str = "pool", settings: Settings | None = None, *, directory: Path | None = None):
        super().__init__(actor_id, settings)
        self.root = Path(directory or self.settings.pool_dir or self.settings.cache_dir / "pool" / self.names.ns)
        self._uploads: dict[tuple[str, str], dict] = {}

    async def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        q = await declare_control_queue(self.channel, self.names, self.names.pool_queue,
                                        [Names.POOL_REQUEST, Names.POOL_UPLOAD],
                                        expires_s=self.settings.queue_expires_s)
        await self.consume(q, self._on_message)
        self.log("pool_ready", root=str(self.root), deployments=self.deployments())

    def deployments(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).exists()) if self.root.exists() else []

    def models(self) -> list[str]:
        """Model deployments: a plan table whose plans are deployments of their own (`<model>.<plan>`)."""
        return sorted(p.name for p in self.root.iterdir() if (p / PLANS).exists()) if self.root.exists() else []

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            msg = self.decode(message, expect=(PartChunk, PartRequest, PoolManifest, ListDeployments, PlanTableMessage,
                                               DeleteDeployment))
        except MessageError as err:
            await self.reply(message, Reply(ok=False, message=err.reason))
            await self.dead_letter(message, err)
            return
        try:
            answer = await self.handle(msg)
        except MessageError as err:
            answer = Reply(ok=False, message=err.reason)
        except Exception as exc:
            answer = Reply(ok=False, message=f"{type(exc).__name__}: {exc}")
        await self.reply(message, answer)
        await self.ack(message)

    async def handle(self, msg: Message) -> Message:
        if isinstance(msg, ListDeployments):
            return Reply(data={"deployments": self.deployments(), "models": self.models()})
        if isinstance(msg, PlanTableMessage):
            return await self._receive_plans(msg)
        if isinstance(msg, DeleteDeployment):
            return await self._delete(msg.deployment)
        if isinstance(msg, PartRequest):
            return await self._serve(msg)
        if isinstance(msg, PartChunk):
            return await self._receive_chunk(msg)
        if isinstance(msg, PoolManifest):
            return await self._receive_manifest(msg)
        return Reply(ok=False, message=f"unexpected {msg.TYPE}")

    def _dir(self, deployment: str) -> Path:
        return self.root / _safe_name(deployment, "deployment")

    def _manifest(self, deployment: str) -> dict:
        path = self._dir(deployment) / MANIFEST
        if not path.exists():
            raise MessageError(f"no deployment {deployment!r} in the pool", "unknown_deployment")
        return _parse_manifest(path.read_text())

    async def _serve(self, req: PartRequest) -> Message:
        if req.deployment == SOURCES:
            return await self._serve_chunk(req, _source_sha(req.file))
        if req.file == PLANS:
            path = self._dir(req.deployment) / PLANS
            if not path.exists():
                raise MessageError(f"no model deployment {req.deployment!r} in the pool", "unknown_deployment")
            return PlanTableMessage(name=req.deployment, table=path.read_text())
        if req.file == MANIFEST:
            self._manifest(req.deployment)
            return PoolManifest(deployment=req.deployment,
                                manifest=(self._dir(req.deployment) / MANIFEST).read_text())
        manifest = self._manifest(req.deployment)
        entry = next((p for p in manifest["parts"] if p["file"] == req.file), None)
        if entry is None:
            return Reply(ok=False, message=f"{req.file!r} is not a part file of {req.deployment!r}")
        return await self._serve_chunk(req, entry["sha256"])

    async def _serve_chunk(self, req: PartRequest, sha256: str) -> Message:
        path = self._dir(req.deployment) / _safe_name(req.file, "file")
        if not path.exists():
            return Reply(ok=False, message=f"no file {req.file!r} in {req.deployment!r}")
        size = path.stat().st_size
        count, clen = chunk_layout(size, self.settings.pool_chunk_bytes)
        if req.index >= count:
            return Reply(ok=False, message=f"chunk {req.index} out of range (file has {count})")

        def read() -> bytes:
            with open(path, "rb") as f:
                f.seek(req.index * clen)
                return f.read(clen)

        data = await asyncio.to_thread(read)
        return PartChunk(deployment=req.deployment, file=req.file, index=req.index, count=count, size=size,
                         sha256=sha256, data=data)

    async def _receive_chunk(self, c: PartChunk) -> Message:
        d = self._dir(c.deployment)
        name = _safe_name(c.file, "file")
        if c.deployment == SOURCES and _source_sha(name) != c.sha256:
            raise MessageError(f"a source is uploaded as <its sha256>.keras, not {name!r}", "bad_name")
        count, clen = chunk_layout(c.size, self.settings.pool_chunk_bytes)
        if c.count != count or c.index >= count:
            # the sender's chunk size may differ from ours: accept its layout if self-consistent
            count, clen = c.count, math.ceil(c.size / c.count) if c.count else 0
            if c.index >= count:
                raise MessageError(f"chunk {c.index} of {count}", "bad_chunk")
        expect_len = clen if c.index < count - 1 else c.size - clen * (count - 1)
        if len(c.data) != expect_len:
            raise MessageError(f"chunk {c.index} has {len(c.data)} bytes, expected {expect_len}", "bad_chunk")
        key = (c.deployment, name)
        up = self._uploads.get(key)
        if up is None or up["sha256"] != c.sha256 or up["count"] != count:
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".{name}.upload"
            with open(tmp, "wb") as f:
                f.truncate(c.size)
            up = self._uploads[key] = {"sha256": c.sha256, "count": count, "got": set(), "tmp": tmp}

        def write() -> None:
            with open(up["tmp"], "r+b") as f:
                f.seek(c.index * clen)
                f.write(c.data)

        await asyncio.to_thread(write)
        up["got"].add(c.index)
        if len(up["got"]) < count:
            return Reply(message=f"chunk {c.index + 1}/{count}")
        del self._uploads[key]
        digest = await asyncio.to_thread(sha256_file, up["tmp"])
        if digest != c.sha256:
            up["tmp"].unlink(missing_ok=True)
            return Reply(ok=False, message=f"{name}: sha256 mismatch after upload")
        os.replace(up["tmp"], d / name)
        self.log("file_stored", deployment=c.deployment, file=name, bytes=c.size)
        return Reply(message=f"{name} stored")

    async def _receive_manifest(self, m: PoolManifest) -> Message:
        if m.deployment == SOURCES:
            raise MessageError(f"{SOURCES!r} is reserved for source models", "bad_name")
        manifest = _parse_manifest(m.manifest)
        d = self._dir(m.deployment)
        for p in manifest["parts"]:
            path = d / _safe_name(p["file"], "file")
            if not path.exists():
                return Reply(ok=False, message=f"part file {p['file']} not uploaded")
            if await asyncio.to_thread(sha256_file, path) != p["sha256"]:
                return Reply(ok=False, message=f"part file {p['file']} does not match the manifest's sha256")
        _atomic_write(d / MANIFEST, m.manifest.encode())
        self.log("deployment_stored", deployment=m.deployment, parts=len(manifest["parts"]))
        return Reply(message=f"deployment {m.deployment} stored ({len(manifest['parts'])} parts)")


    async def _receive_plans(self, m: PlanTableMessage) -> Message:
        """A model's plan table: kept only when every plan's deployment is in the pool (uploaded first)."""
        try:
            doc = json.loads(m.table)
            plans = [p["id"] for p in doc["table"]["plans"]]
        except Exception:
            raise MessageError("invalid plan table: needs table.plans with ids", "bad_plans") from None
        missing = [p for p in plans if not (self._dir(plan_deployment_name(m.name, p)) / MANIFEST).exists()]
        if missing:
            return Reply(ok=False, message=f"plan deployment {plan_deployment_name(m.name, missing[0])} is not in "
                                           f"the pool")
        d = self._dir(m.name)
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(d / PLANS, m.table.encode())
        self.log("plans_stored", model=m.name, plans=plans)
        return Reply(message=f"plan table of {m.name} stored ({len(plans)} plans)")

    async def _delete(self, deployment: str) -> Message:
        """Forget a deployment; for a model, its plan table and every plan deployment `<model>:<plan>` too."""
        import shutil

        if deployment == SOURCES:
            raise MessageError("the sources are not a deployment", "bad_name")
        d = self._dir(deployment)
        doomed = [d] + ([p for p in self.root.iterdir() if p.name.startswith(plan_deployment_name(deployment, ""))]
                        if (d / PLANS).exists() else [])
        gone = [p.name for p in doomed if p.exists()]
        for p in doomed:
            await asyncio.to_thread(shutil.rmtree, p, True)
        self.log("deleted", deployment=deployment, entries=gone)
        return Reply(ok=bool(gone), message=f"deleted {', '.join(gone)}" if gone else f"no {deployment!r} in the pool")


def _source_sha(file: str) -> str:
    stem = file[:-len(".keras")] if file.endswith(".keras") else ""
    if not re.fullmatch(r"[0-9a-f]{64}", stem):
        raise MessageError(f"{file!r} is not a source name (<sha256>.keras)", "bad_name")
    return stem


def _parse_manifest(text: str) -> dict:
    """What the pool needs of a manifest (parts' files and hashes), checked without importing the splitter (and so
    TensorFlow): the pool is a storage actor. Servers validate the full Manifest when they load."""
    try:
        doc = json.loads(text)
        parts = doc["parts"]
        assert isinstance(parts, list) and parts
        for p in parts:
            assert isinstance(p["name"], str) and isinstance(p["file"], str)
            assert isinstance(p["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", p["sha256"])
            _safe_name(p["file"], "file")
    except MessageError:
        raise
    except Exception:
        raise MessageError("invalid manifest: needs parts with name, file and sha256", "bad_manifest") from None
    return doc


# ---------------------------------------------------------------------- helpers for any actor

async def upload_file(actor: Actor, deployment: str, file: str, data: bytes, sha256: str,
                      chunk_bytes: int | None = None, parallel: int = 4) -> None:
    """Upload one file to the pool in hash-checked chunks (the pool keeps it once every chunk arrived)."""
    chunk_bytes = chunk_bytes or actor.settings.pool_chunk_bytes
    count, clen = chunk_layout(len(data), chunk_bytes)
    sem = asyncio.Semaphore(parallel)

    async def put(i: int) -> None:
        chunk = PartChunk(deployment=deployment, file=file, index=i, count=count, size=len(data), sha256=sha256,
                          data=data[i * clen:(i + 1) * clen])
        async with sem:
            r = await actor.rpc(Names.POOL_UPLOAD, chunk)
        if not isinstance(r, Reply) or not r.ok:
            raise PoolError(f"upload of {file} failed: {getattr(r, 'message', r)}")

    await asyncio.gather(*(put(i) for i in range(count)))


async def upload_split(actor: Actor, split_dir: Path, deployment: str | None = None,
                       chunk_bytes: int | None = None, parallel: int = 4) -> str:
    """Upload a split's part files (chunked) and then its manifest; returns the deployment id."""
    from splitinfer.splitter.manifest import Manifest

    split_dir = Path(split_dir)
    manifest = Manifest.load(split_dir)
    deployment = deployment or manifest.split_id
    for p in manifest.parts:
        await upload_file(actor, deployment, p.file, (split_dir / p.file).read_bytes(), p.sha256, chunk_bytes,
                          parallel)
    r = await actor.rpc(Names.POOL_UPLOAD, PoolManifest(deployment=deployment, manifest=manifest.model_dump_json()))
    if not isinstance(r, Reply) or not r.ok:
        raise PoolError(f"manifest upload failed: {getattr(r, 'message', r)}")
    return deployment


async def upload_source(actor: Actor, path: Path) -> str:
    """Put a .keras model file into the pool's sources; returns its `pool:<sha256>` name for DeployModel."""
    data = await asyncio.to_thread(Path(path).read_bytes)
    digest = hashlib.sha256(data).hexdigest()
    await upload_file(actor, SOURCES, f"{digest}.keras", data, digest)
    return f"pool:{digest}"


async def fetch_file(actor: Actor, deployment: str, file: str, sha256: str, target: Path, parallel: int = 4) -> None:
    """One file from the pool into `target`, chunk by chunk, sha256-checked; a file already there with that hash
    is kept."""
    target = Path(target)
    if target.exists() and await asyncio.to_thread(sha256_file, target) == sha256:
        return
    first = await actor.rpc(Names.POOL_REQUEST, PartRequest(deployment=deployment, file=file, index=0))
    if not isinstance(first, PartChunk):
        raise PoolError(f"pool cannot serve {file}: {getattr(first, 'message', first)}")
    chunks: dict[int, bytes] = {0: first.data}
    sem = asyncio.Semaphore(parallel)

    async def get(i: int) -> None:
        async with sem:
            c = await actor.rpc(Names.POOL_REQUEST, PartRequest(deployment=deployment, file=file, index=i))
            if not isinstance(c, PartChunk) or c.index != i:
                raise PoolError(f"bad chunk {i} of {file}: {getattr(c, 'message', c)}")
            chunks[i] = c.data

    await asyncio.gather(*(get(i) for i in range(1, first.count)))
    data = b"".join(chunks[i] for i in range(first.count))
    digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
    if len(data) != first.size or digest != sha256:
        raise PoolError(f"{file} from the pool does not match its sha256")
    target.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(_atomic_write, target, data)


async def fetch_source(actor: Actor, name: str, dest_dir: Path) -> Path:
    """A source model uploaded with upload_source (`pool:<sha256>`), as a local .keras file."""
    digest = name.removeprefix("pool:")
    file = f"{_source_sha(digest + '.keras')}.keras"
    target = Path(dest_dir) / file
    await fetch_file(actor, SOURCES, file, digest, target)
    return target


async def fetch_deployment(actor: Actor, deployment: str, dest: Path, parts: list[str] | None = None,
                           parallel: int = 4):
    """The deployment's manifest and the part files named (all if None) into dest, each sha256-checked; files
    already there with the right hash are kept. Returns the Manifest."""
    from splitinfer.splitter.manifest import Manifest

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    r = await actor.rpc(Names.POOL_REQUEST, PartRequest(deployment=deployment, file=MANIFEST))
    if not isinstance(r, PoolManifest):
        raise PoolError(f"pool has no deployment {deployment!r}: {getattr(r, 'message', r)}")
    manifest = Manifest.model_validate_json(r.manifest)
    for entry in manifest.parts:
        if parts is None or entry.name in parts:
            await fetch_file(actor, deployment, entry.file, entry.sha256, dest / entry.file, parallel)
    _atomic_write(dest / MANIFEST, r.manifest.encode())
    return manifest


async def fetch_plan_table(actor: Actor, model: str) -> dict | None:
    """A model deployment's plans.json (table, cost graph, origin) as a dict, or None when it has none."""
    r = await actor.rpc(Names.POOL_REQUEST, PartRequest(deployment=model, file=PLANS))
    if not isinstance(r, PlanTableMessage):
        return None
    return json.loads(r.table)


async def delete_deployment(actor: Actor, deployment: str) -> Reply:
    r = await actor.rpc(Names.POOL_UPLOAD, DeleteDeployment(deployment=deployment))
    return r if isinstance(r, Reply) else Reply(ok=False, message=str(r))


async def send_load_orders(actor: Actor, deployment: str, placement: dict[str, list[str]],
                           timeout: float = 300.0) -> dict[tuple[str, str], Reply]:
    """Order servers to load parts: placement = {part: [server id per replica]}. Waits for every answer."""

    async def one(part: str, k: int, servers: list[str]) -> tuple[tuple[str, str], Reply]:
        order = LoadPart(server_id=servers[k], deployment=deployment, part=part, replica=k, replicas=len(servers))
        try:
            r = await actor.rpc(actor.names.load_key(servers[k]), order, timeout=timeout)
        except asyncio.TimeoutError:
            r = Reply(ok=False, message=f"{servers[k]} did not answer within {timeout}s")
        return (part, servers[k]), r if isinstance(r, Reply) else Reply(ok=False, message=str(r))

    results = await asyncio.gather(*(one(p, k, s) for p, s in placement.items() for k in range(len(s))))
    return dict(results)


async def send_unload_orders(actor: Actor, deployment: str, placement: dict[str, list[str]],
                             timeout: float = 30.0) -> dict[tuple[str, str], Reply]:
    """Order servers to drop parts (a deploy rolled back): placement = {part: [server id, ...]}."""

    async def one(part: str, server: str) -> tuple[tuple[str, str], Reply]:
        try:
            r = await actor.rpc(actor.names.unload_key(server),
                                UnloadPart(server_id=server, deployment=deployment, part=part), timeout=timeout)
        except asyncio.TimeoutError:
            r = Reply(ok=False, message=f"{server} did not answer within {timeout}s")
        return (part, server), r if isinstance(r, Reply) else Reply(ok=False, message=str(r))

    results = await asyncio.gather(*(one(p, s) for p, servers in placement.items() for s in servers))
    return dict(results)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splitinfer.actors.model_pool", description=__doc__.splitlines()[0])
    ap.add_argument("--id", default="pool")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args(argv)
    run_actor(ModelPool(args.id, directory=args.dir))


if __name__ == "__main__":
    main()
