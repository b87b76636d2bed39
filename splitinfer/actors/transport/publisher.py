"""Confirmed publishing: a publish returns once the broker confirmed it, and is retried with the PUBLISH backoff on
a nack, a returned message or a lost channel. `soon()` starts one and returns its task, so the caller goes on while
the confirm is pending (outputs are forwarded at once; their inputs are acked when the confirm arrives).

Durability by what a message carries: tensors are ephemeral (recomputed after a broker restart, never the only copy
of work) and go out transient; jobs, results, errors and control messages go out persistent, so a durable queue
keeps them across a broker restart. A caller may say otherwise (`persistent=`)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import aio_pika

from splitinfer.actors.transport.connection import Connection
from splitinfer.actors.transport.log import Logger, first_line
from splitinfer.actors.transport.retry import PUBLISH, Backoff, Forbidden, Unroutable, classify
from splitinfer.messages import Message, encode


EPHEMERAL_EXCHANGES = frozenset({"tensors"})


class Publisher:
    def __init__(self, connection: Connection, log: Logger, spawn: Callable[[Awaitable], asyncio.Task]):
        self.connection = connection
        self.log = log
        self.spawn = spawn
        self.closed = False                     # the owner stopped: no more retries

    async def publish(self, exchange: str, routing_key: str, msg: Message | bytes, *, headers: dict | None = None,
                      reply_to: str | None = None, correlation_id: str | None = None, mandatory: bool = True,
                      persistent: bool | None = None, backoff: Backoff = PUBLISH) -> None:
        """Publish and wait for the confirm. `exchange` as `Connection.exchange` takes it. A message no queue takes
        raises Unroutable once the tries are spent; other failures raise what the last try raised."""
        body = msg if isinstance(msg, (bytes, bytearray)) else encode(msg)
        if persistent is None:
            persistent = exchange not in EPHEMERAL_EXCHANGES
        amqp_msg = aio_pika.Message(
            body=bytes(body), headers=headers or {}, reply_to=reply_to, correlation_id=correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT)
        delays = backoff.delays()
        attempt = 0
        while True:
            attempt += 1
            try:
                ex = await self.connection.exchange(exchange)
                await ex.publish(amqp_msg, routing_key=routing_key, mandatory=mandatory)
                return
            except Exception as exc:
                kind = classify(exc)
                delay = next(delays, None) if kind not in ("fatal", "forbidden") and not self.closed else None
                if delay is None:
                    if kind == "forbidden":
                        raise Forbidden(f"the broker refused this user a publish to {exchange or 'the default exchange'} "
                                        f"with key {routing_key!r}: {first_line(exc)}") from None
                    if kind == "unroutable":
                        raise Unroutable(f"no queue takes {routing_key!r} on {exchange or 'the default exchange'}") \
                            from None
                    raise
                self.log.warning("publish_retry", exchange=exchange, key=routing_key, attempt=attempt, why=kind,
                                 error=f"{type(exc).__name__}: {str(exc)[:200]}")
                await asyncio.sleep(delay)

    def soon(self, exchange: str, routing_key: str, msg: Message | bytes, **kw) -> asyncio.Task:
        """Start a confirmed publish and return its task: the caller goes on while the confirm is pending."""
        return self.spawn(self.publish(exchange, routing_key, msg, **kw))
