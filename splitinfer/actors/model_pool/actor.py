"""The model pool actor: stores deployments and serves them over the broker, so no machine needs a shared disk.

Protocol (RPC on `<ns>.control`, answers to the caller's reply_to; a refusal is a Reply(ok=False) saying why):
- key `pool.upload`: PartChunk -> Reply (the file is kept once all chunks arrived with the whole file's sha256);
  PoolManifest -> Reply (kept only if every part file it names is there with the manifest's sha256);
  PlanTableMessage -> Reply (a model deployment's plan table, kept once its plans' deployments are there);
  DeleteDeployment -> Reply (a deployment, or a model with all its plans).
- key `pool.request`: PartRequest(d, "manifest.json") -> PoolManifest; PartRequest(model, "plans.json") ->
  PlanTableMessage; PartRequest(d, file, index) -> PartChunk (only files the manifest names, and sources);
  ListDeployments -> DeploymentList.
- Sources: a .keras file uploaded as deployment `sources`, file `<sha256>.keras`, so that the optimizer on another
  machine can fetch a user's model; never listed as a deployment.

    python -m splitinfer.actors.model_pool [--id pool] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.actor import Actor, run_actor
from splitinfer.actors.model_pool.store import PLANS_FILE, PoolStore
from splitinfer.actors.transport import first_line
from splitinfer.actors.transport.topology import Names, declare_control_queue
from splitinfer.config import Settings
from splitinfer.messages import (
    DeleteDeployment,
    DeploymentList,
    ListDeployments,
    Message,
    MessageError,
    PartChunk,
    PartRequest,
    PlanTableMessage,
    PoolManifest,
    Reply,
)
from splitinfer.splitter.manifest import MANIFEST_FILE


class ModelPool(Actor):
    kind = "model_pool"

    def __init__(self, actor_id: str = "pool", settings: Settings | None = None, *, directory: Path | None = None):
        super().__init__(actor_id, settings)
        root = Path(directory or self.settings.pool_dir or self.settings.cache_dir / "pool" / self.names.ns)
        self.store = PoolStore(root, self.settings.pool_chunk_bytes)

    async def setup(self) -> None:
        self.store.root.mkdir(parents=True, exist_ok=True)
        q = await declare_control_queue(self.channel, self.names, self.names.pool_queue,
                                        [Names.POOL_REQUEST, Names.POOL_UPLOAD], self.connection.policy)
        await self.consume(q, self._on_message)
        self.log("pool_ready", root=str(self.store.root), deployments=self.store.deployments())

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            msg = self.decode(message, expect=(PartChunk, PartRequest, PoolManifest, ListDeployments, PlanTableMessage,
                                               DeleteDeployment))
        except MessageError as err:
            await self.rpc.reply(message, Reply(ok=False, message=err.reason))
            await self.dead_letter(message, err)
            return
        try:
            answer = await self.handle(msg)
        except MessageError as err:
            answer = Reply(ok=False, message=err.reason)
        except Exception as exc:
            answer = Reply(ok=False, message=first_line(exc))
        await self.rpc.reply(message, answer)
        await self.deliveries.ack(message)

    async def handle(self, msg: Message) -> Message:
        store = self.store
        if isinstance(msg, ListDeployments):
            return DeploymentList(deployments=store.deployments(), models=store.models())
        if isinstance(msg, PartRequest):
            if msg.file == PLANS_FILE:
                return store.plans(msg.deployment)
            if msg.file == MANIFEST_FILE:
                return PoolManifest(deployment=msg.deployment, manifest=store.manifest_text(msg.deployment))
            path, sha256 = store.file_to_serve(msg.deployment, msg.file)
            data, count, size = await asyncio.to_thread(store.read_chunk, path, msg.index)
            return PartChunk(deployment=msg.deployment, file=msg.file, index=msg.index, count=count, size=size,
                             sha256=sha256, data=data)
        if isinstance(msg, PartChunk):
            done = await asyncio.to_thread(store.receive_chunk, msg.deployment, msg.file, msg.index, msg.count,
                                           msg.size, msg.sha256, msg.data)
            if done:
                self.log("file_stored", deployment=msg.deployment, file=msg.file, bytes=msg.size)
                return Reply(message=f"{msg.file} stored")
            return Reply(message=f"chunk {msg.index + 1}/{msg.count}")
        if isinstance(msg, PoolManifest):
            parts = await asyncio.to_thread(store.store_manifest, msg.deployment, msg.manifest)
            self.log("deployment_stored", deployment=msg.deployment, parts=parts)
            return Reply(message=f"deployment {msg.deployment} stored ({parts} parts)")
        if isinstance(msg, PlanTableMessage):
            plans = store.store_plans(msg)
            self.log("plans_stored", model=msg.name, plans=plans)
            return Reply(message=f"plan table of {msg.name} stored ({len(plans)} plans)")
        if isinstance(msg, DeleteDeployment):
            gone = await asyncio.to_thread(store.delete, msg.deployment)
            self.log("deleted", deployment=msg.deployment, entries=gone)
            return Reply(ok=bool(gone), message=f"deleted {', '.join(gone)}" if gone
                         else f"no {msg.deployment!r} in the pool")
        return Reply(ok=False, message=f"unexpected {msg.TYPE}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splitinfer.actors.model_pool", description=__doc__.splitlines()[0])
    ap.add_argument("--id", default="pool")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args(argv)
    run_actor(ModelPool(args.id, directory=args.dir))
