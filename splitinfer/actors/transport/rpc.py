"""Request/response over the broker: a request carries reply_to (an exclusive reply queue of the caller's own) and
a correlation id; the answer is decoded, validated and checked against the type the caller expects.

A service that cannot do what was asked answers a `Reply(ok=False, message=...)`; `call(..., expect=T)` turns that
into `RemoteError(message)`, and an answer of another type than T too, so callers get typed answers or an error. Every
wait fails with `Stopped` when its owner stops, and with `TimeoutError` after its timeout.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TypeVar

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from splitinfer.actors.transport.connection import Connection
from splitinfer.actors.transport.publisher import Publisher
from splitinfer.messages import Message, MessageError, Reply, decode

T = TypeVar("T", bound=Message)


class Stopped(RuntimeError):
    """The owner is stopping: pending waits fail with this instead of hanging."""


class RemoteError(RuntimeError):
    """The service answered, but not with what was asked for (its message says why, in one line)."""


class RpcClient:
    def __init__(self, connection: Connection, publisher: Publisher, *, max_bytes: int, timeout_s: float):
        self.connection = connection
        self.publisher = publisher
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._pending: dict[str, asyncio.Future] = {}
        self._queue: AbstractQueue | None = None
        self._stopped = False

    async def call(self, routing_key: str, msg: Message, *, expect: type[T] | tuple[type[Message], ...] = Message,
                   exchange: str = "control", timeout: float | None = None) -> T:
        if self._stopped:
            raise Stopped("stopping")
        if self._queue is None:
            assert self.connection.channel is not None
            self._queue = await self.connection.channel.declare_queue(exclusive=True, auto_delete=True)
            await self._queue.consume(self._on_reply, no_ack=True)
        corr = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        try:
            await self.publisher.publish(exchange, routing_key, msg, reply_to=self._queue.name, correlation_id=corr)
            answer = await asyncio.wait_for(fut, timeout or self.timeout_s)
        finally:
            self._pending.pop(corr, None)
        if isinstance(answer, Reply) and not answer.ok:
            raise RemoteError(answer.message or f"{routing_key}: refused")
        if not isinstance(answer, expect):
            raise RemoteError(f"{routing_key} answered {answer.TYPE}, not {getattr(expect, 'TYPE', expect)}")
        return answer

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._pending.get(message.correlation_id or "")
        if fut is None or fut.done():
            return
        try:
            fut.set_result(decode(message.body, max_bytes=self.max_bytes))
        except MessageError as exc:
            fut.set_exception(exc)

    async def reply(self, request: AbstractIncomingMessage, msg: Message) -> None:
        """Answer a request (nothing to do when it has no reply_to)."""
        if request.reply_to:
            await self.publisher.publish("", request.reply_to, msg, correlation_id=request.correlation_id,
                                         mandatory=False)

    def stop(self) -> None:
        self._stopped = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(Stopped("stopping"))
        self._pending.clear()
