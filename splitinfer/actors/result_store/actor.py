"""The result store actor: binds its own durable queue to `<ns>.results` with `#`, writes each result and error
to the store and acks it only after the row is committed.

    python -m splitinfer.actors.result_store [--id result_store] [--url sqlite:///path.db]
"""

from __future__ import annotations

import argparse

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.actor import Actor, run_actor
from splitinfer.actors.result_store.store import ResultStore
from splitinfer.actors.transport.topology import INTERNAL_REPLY_PREFIX, escape_key, queue_arguments
from splitinfer.messages import ErrorResult, MessageError, ResultMessage

INTERNAL_KEY_PREFIX = escape_key(INTERNAL_REPLY_PREFIX)


def _summary(outputs: dict) -> dict:
    return {name: {"shape": list(arr.shape), "dtype": arr.dtype.str} for name, arr in outputs.items()}


class ResultStoreActor(Actor):
    kind = "result_store"

    def __init__(self, actor_id: str = "result_store", settings=None, url: str | None = None):
        super().__init__(actor_id, settings)
        self.store = ResultStore(url or self.settings.results_url())

    @property
    def queue_name(self) -> str:
        return f"{self.names.ns}.result_store"

    async def setup(self) -> None:
        assert self.channel is not None
        queue = await self.channel.declare_queue(
            self.queue_name, durable=True,
            arguments=queue_arguments(self.names, expires_s=self.settings.queue_expires_s))
        await queue.bind(self.exchanges["results"], routing_key="#")
        await self.consume(queue, self.on_message)
        self.log("storing", url=self.store.url, queue=self.queue_name)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        if (message.routing_key or "").startswith(INTERNAL_KEY_PREFIX):
            # a model server's error about a front end's request: the front end answers the job with it
            await self.deliveries.ack(message)
            return
        try:
            msg = self.decode(message, expect=(ResultMessage, ErrorResult))
        except MessageError as exc:
            # not something we can store as a result: keep the fact, dead-letter the bytes (no error result:
            # answering a broken answer on the results exchange would loop)
            job_id, reason = exc.job_id, exc.reason
            await self.run_in_worker(lambda: self.store.add(
                self.names.ns, "error", job_id, code="undecodable_result", message=reason,
                served_by=message.routing_key))
            self.stats["errors"] += 1
            await self.deliveries.reject(message)
            return
        body = bytes(message.body)
        if isinstance(msg, ResultMessage):
            row = dict(kind="result", deployment=msg.deployment, latency_s=msg.latency_s, served_by=msg.served_by,
                       hops=[h.model_dump() for h in msg.hops], outputs=_summary(msg.outputs), plan=msg.plan)
        else:
            row = dict(kind="error", deployment=msg.deployment, code=msg.code, message=msg.message,
                       served_by=msg.where, plan=msg.plan)
        kind = row.pop("kind")
        await self.run_in_worker(lambda: self.store.add(self.names.ns, kind, msg.job_id, body=body, **row))
        self.stats["processed"] += 1
        await self.deliveries.ack(message)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitinfer.actors.result_store",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--id", default="result_store")
    parser.add_argument("--url", default=None, help="result store URL (default: settings.result_store_url)")
    args = parser.parse_args(argv)
    run_actor(ResultStoreActor(args.id, url=args.url))
