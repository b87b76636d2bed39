"""The result store actor: binds its own durable queue to `<ns>.results` with `#`, writes each answer (a part's
result frame, a front end's assembled result, an error) to the store and acks it only after its row is committed;
what arrives while a write runs goes in the next one (one transaction per batch).

    python -m splitinfer.actors.result_store [--id result_store] [--url sqlite:///path.db]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.actor import Actor, run_actor
from splitinfer.actors.result_store.store import ResultStore
from splitinfer.actors.transport.topology import UNKEPT, declare_kept_queue, is_internal_key
from splitinfer.messages import ErrorResult, MessageError, ResultMessage
from splitinfer.messages.frames import decode_frame, is_frame, result_message

def _summary(outputs: dict) -> dict:
    return {name: {"shape": list(arr.shape), "dtype": arr.dtype.str} for name, arr in outputs.items()}


class ResultStoreActor(Actor):
    kind = "result_store"

    def __init__(self, actor_id: str = "result_store", settings=None, url: str | None = None):
        super().__init__(actor_id, settings)
        self.store = ResultStore(url or self.settings.results_url())
        self._pending: list[tuple[dict, AbstractIncomingMessage]] = []
        self._writer: asyncio.Task | None = None

    @property
    def queue_name(self) -> str:
        return self.names.result_store_queue

    async def setup(self) -> None:
        assert self.channel is not None
        queue = await declare_kept_queue(self.channel, self.names, self.queue_name, self.connection.policy)
        await queue.bind(self.exchanges["results"], routing_key="#")
        await self.consume(queue, self.on_message)
        self.log("storing", url=self.store.url, queue=self.queue_name)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        if is_internal_key(message.routing_key) or (message.headers or {}).get(UNKEPT):
            # a model server's error about a front end's request (the front end answers the job with it), or an
            # answer sent again (stored when it first went out)
            await self.deliveries.ack(message)
            return
        try:
            if is_frame(message.body):  # a part's answer: a result frame
                frame = decode_frame(message.body, self.settings.max_message_bytes)
                sub = frame.meta.get("sub")
                msg = result_message(frame, latency_s=None if sub is None else max(0.0, time.time() - sub))
            else:
                msg = self.decode(message, expect=(ResultMessage, ErrorResult))
        except MessageError as exc:
            # not something we can store as a result: keep the fact, dead-letter the bytes (no error result:
            # answering a broken answer on the results exchange would loop)
            job_id, reason = exc.job_id, exc.reason
            await self.run_in_worker(lambda: self.store.add(
                self.names.ns, "error", job_id, code="undecodable_result", message=reason,
                served_by=message.routing_key))
            self.stats["errors"] += 1
            await self.to_dead_letters(message, "undecodable_result", reason)
            return
        row = dict(namespace=self.names.ns, job_id=msg.job_id, deployment=msg.deployment, plan=msg.plan,
                   body=bytes(message.body))
        if isinstance(msg, ResultMessage):
            row.update(kind="result", latency_s=msg.latency_s, served_by=msg.served_by,
                       hops=[h.model_dump() for h in msg.hops], outputs=_summary(msg.outputs))
        else:
            row.update(kind="error", code=msg.code, message=msg.message, served_by=msg.where)
        self._pending.append((row, message))
        if self._writer is None or self._writer.done():
            self._writer = self.spawn(self._write())

    async def _write(self) -> None:
        """Write what has come in, in one transaction, then ack it; what comes in meanwhile is the next batch."""
        while self._pending:
            batch, self._pending = self._pending, []
            await self.run_in_worker(self.store.add_many, [row for row, _ in batch])
            for _, message in batch:
                await self.deliveries.ack(message)
            self.stats["processed"] += len(batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitinfer.actors.result_store",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--id", default="result_store")
    parser.add_argument("--url", default=None, help="result store URL (default: settings.result_store_url)")
    args = parser.parse_args(argv)
    run_actor(ResultStoreActor(args.id, url=args.url))
