"""Deliveries in hand: every message given to a handler is tracked until it is settled, exactly one way.

- `ack`: done (its outputs are confirmed);
- `requeue`: hand it back, the broker delivers it again (here or to another consumer);
- `reject`: it can never succeed, to the queue's dead-letter exchange (`<ns>.dead`);
- `ack_when_confirmed`: ack inputs once every publish they caused is confirmed, or requeue them if one finally
  failed, so another try redoes the work. Off the critical path: it returns a task.

Settling a message whose channel is gone is a no-op: the broker already requeued it. On stop, whatever is still
in hand is requeued (`requeue_all`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, Callable, Iterable

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.transport.log import Logger


def header_str(message: AbstractIncomingMessage, key: str) -> str | None:
    """A string AMQP header of a delivery, or None."""
    v = (message.headers or {}).get(key)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return v if isinstance(v, str) and v else None


class Deliveries:
    def __init__(self, log: Logger, spawn: Callable[[Awaitable], asyncio.Task]):
        self.log = log
        self.spawn = spawn
        self._held: dict[int, AbstractIncomingMessage] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._held)

    def track(self, message: AbstractIncomingMessage) -> None:
        self._held[id(message)] = message
        self._empty.clear()

    def _release(self, message: AbstractIncomingMessage) -> None:
        self._held.pop(id(message), None)
        if not self._held:
            self._empty.set()

    async def ack(self, message: AbstractIncomingMessage) -> None:
        self._release(message)
        with contextlib.suppress(Exception):  # a tag from a closed channel: the broker already requeued it
            await message.ack()

    async def requeue(self, message: AbstractIncomingMessage) -> None:
        self._release(message)
        with contextlib.suppress(Exception):
            await message.nack(requeue=True)

    async def reject(self, message: AbstractIncomingMessage) -> None:
        """To the dead-letter queue (the queue's x-dead-letter-exchange), never redelivered."""
        self._release(message)
        with contextlib.suppress(Exception):
            await message.reject(requeue=False)

    def ack_when_confirmed(self, messages: Iterable[AbstractIncomingMessage], confirms: Iterable[asyncio.Task],
                           on_done: Callable[[bool], None] | None = None) -> asyncio.Task:
        messages, confirms = list(messages), list(confirms)

        async def settle() -> None:
            results = await asyncio.gather(*confirms, return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            for m in messages:
                await (self.requeue(m) if failed else self.ack(m))
            if failed:
                self.log.error("publish_failed", error=f"{type(failed[0]).__name__}: {failed[0]}",
                               inputs=len(messages))
            if on_done is not None:
                on_done(not failed)

        return self.spawn(settle())

    async def drain(self, timeout_s: float) -> int:
        """Wait up to timeout_s for the held deliveries to be settled, then requeue the rest; how many were."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        handed_back = len(self._held)
        for message in list(self._held.values()):
            await self.requeue(message)
        return handed_back
