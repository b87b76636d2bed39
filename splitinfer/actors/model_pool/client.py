"""The model pool's typed client: upload and fetch deployments and sources in hash-checked chunks, read and store
plan tables, list and delete. Used by the servers (fetch their parts), the optimizer, the front end and the SDK."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from splitinfer.actors.model_pool.store import PLANS_FILE, SOURCES, atomic_write, chunk_layout, source_sha
from splitinfer.actors.transport import RemoteError, RpcClient
from splitinfer.actors.transport.topology import Names
from splitinfer.messages import (
    DeleteDeployment,
    DeploymentList,
    ListDeployments,
    PartChunk,
    PartRequest,
    PlanTableMessage,
    PoolManifest,
    Reply,
)
from splitinfer.splitter.manifest import MANIFEST_FILE, Manifest, file_sha256

PARALLEL_CHUNKS = 4  # chunk requests in flight per file


class PoolError(RuntimeError):
    """The pool refused or could not serve a transfer (the message says why)."""


class PoolClient:
    def __init__(self, rpc: RpcClient, chunk_bytes: int):
        self.rpc = rpc
        self.chunk_bytes = chunk_bytes

    async def _ask(self, key: str, msg, expect, timeout: float | None = None):
        try:
            return await self.rpc.call(key, msg, expect=expect, timeout=timeout)
        except RemoteError as exc:
            raise PoolError(str(exc)) from None

    # ------------------------------------------------------------------ listing and plan tables
    async def listing(self, timeout: float | None = None) -> DeploymentList:
        return await self._ask(Names.POOL_REQUEST, ListDeployments(), DeploymentList, timeout)

    async def manifest_text(self, deployment: str, timeout: float | None = None) -> str:
        r = await self._ask(Names.POOL_REQUEST, PartRequest(deployment=deployment, file=MANIFEST_FILE), PoolManifest,
                            timeout)
        return r.manifest

    async def manifest(self, deployment: str, timeout: float | None = None) -> Manifest:
        return Manifest.model_validate_json(await self.manifest_text(deployment, timeout))

    async def plan_table(self, model: str) -> PlanTableMessage | None:
        """A model deployment's stored plan table, or None when the pool has none by that name."""
        try:
            return await self.rpc.call(Names.POOL_REQUEST, PartRequest(deployment=model, file=PLANS_FILE),
                                       expect=PlanTableMessage)
        except RemoteError:
            return None

    async def store_plan_table(self, msg: PlanTableMessage) -> None:
        await self._ask(Names.POOL_UPLOAD, msg, Reply)

    async def delete(self, deployment: str) -> Reply:
        """Forget a deployment (a model: with its plans); Reply(ok=False) when there was nothing by that name."""
        try:
            return await self.rpc.call(Names.POOL_UPLOAD, DeleteDeployment(deployment=deployment), expect=Reply)
        except RemoteError as exc:
            return Reply(ok=False, message=str(exc))

    # ------------------------------------------------------------------ uploads
    async def upload_file(self, deployment: str, file: str, data: bytes, sha256: str) -> None:
        """One file in hash-checked chunks (the pool keeps it once every chunk arrived)."""
        count, clen = chunk_layout(len(data), self.chunk_bytes)
        sem = asyncio.Semaphore(PARALLEL_CHUNKS)

        async def put(i: int) -> None:
            chunk = PartChunk(deployment=deployment, file=file, index=i, count=count, size=len(data), sha256=sha256,
                              data=data[i * clen:(i + 1) * clen])
            async with sem:
                await self._ask(Names.POOL_UPLOAD, chunk, Reply)

        await asyncio.gather(*(put(i) for i in range(count)))

    async def upload_split(self, split_dir: Path, deployment: str | None = None) -> str:
        """A split's part files (chunked), then its manifest; returns the deployment id."""
        split_dir = Path(split_dir)
        manifest = Manifest.load(split_dir)
        deployment = deployment or manifest.split_id
        for f in (f for p in manifest.parts for f in p.files()):
            data = await asyncio.to_thread((split_dir / f.file).read_bytes)
            await self.upload_file(deployment, f.file, data, f.sha256)
        await self._ask(Names.POOL_UPLOAD, PoolManifest(deployment=deployment, manifest=manifest.model_dump_json()),
                        Reply)
        return deployment

    async def upload_source(self, path: Path) -> str:
        """A .keras model file into the pool's sources; returns its `pool:<sha256>` name for DeployModel."""
        data = await asyncio.to_thread(Path(path).read_bytes)
        digest = hashlib.sha256(data).hexdigest()
        await self.upload_file(SOURCES, f"{digest}.keras", data, digest)
        return f"pool:{digest}"

    # ------------------------------------------------------------------ downloads
    async def fetch_file(self, deployment: str, file: str, sha256: str, target: Path) -> None:
        """One file into `target`, chunk by chunk, sha256-checked; a file already there with that hash is kept."""
        target = Path(target)
        if target.exists() and await asyncio.to_thread(file_sha256, target) == sha256:
            return
        first = await self._ask(Names.POOL_REQUEST, PartRequest(deployment=deployment, file=file, index=0), PartChunk)
        chunks: dict[int, bytes] = {0: first.data}
        sem = asyncio.Semaphore(PARALLEL_CHUNKS)

        async def get(i: int) -> None:
            async with sem:
                c = await self._ask(Names.POOL_REQUEST, PartRequest(deployment=deployment, file=file, index=i),
                                    PartChunk)
            if c.index != i:
                raise PoolError(f"asked for chunk {i} of {file}, got {c.index}")
            chunks[i] = c.data

        await asyncio.gather(*(get(i) for i in range(1, first.count)))
        data = b"".join(chunks[i] for i in range(first.count))
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        if len(data) != first.size or digest != sha256:
            raise PoolError(f"{file} from the pool does not match its sha256")
        target.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(atomic_write, target, data)

    async def fetch_source(self, name: str, dest_dir: Path) -> Path:
        """A source model uploaded with upload_source (`pool:<sha256>`), as a local .keras file."""
        digest = source_sha(name.removeprefix("pool:") + ".keras")
        target = Path(dest_dir) / f"{digest}.keras"
        await self.fetch_file(SOURCES, target.name, digest, target)
        return target

    async def fetch_deployment(self, deployment: str, dest: Path, parts: list[str] | None = None) -> Manifest:
        """The manifest and the part files named (all if None) into dest, each sha256-checked; files already there
        with the right hash are kept."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        text = await self.manifest_text(deployment)
        manifest = Manifest.model_validate_json(text)
        for entry in manifest.parts:
            if parts is None or entry.name in parts:
                for f in entry.files():
                    await self.fetch_file(deployment, f.file, f.sha256, dest / f.file)
        await asyncio.to_thread(atomic_write, dest / MANIFEST_FILE, text.encode())
        return manifest
