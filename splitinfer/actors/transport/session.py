"""A session with the broker for code that is not an actor process (the SDK's Client, the supervisor): a
connection, a publisher and an RPC client, and the tasks they start, closed together. No presence, no consumers of
its own beyond what its owner declares."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable

from splitinfer.actors.transport.connection import Connection
from splitinfer.actors.transport.log import Logger
from splitinfer.actors.transport.publisher import Publisher
from splitinfer.actors.transport.rpc import RpcClient
from splitinfer.actors.transport.topology import Names
from splitinfer.config import Settings


class Session:
    def __init__(self, settings: Settings, name: str, log: Logger | None = None):
        self.settings = settings
        self.names = Names(settings.namespace)
        self.log = log or Logger.silent(name, "session")
        self.connection = Connection(settings.broker_url, self.names, f"{name}@{self.names.ns}",
                                     prefetch=settings.prefetch, queue_expires_s=settings.queue_expires_s)
        self.publisher = Publisher(self.connection, self.log, self.spawn)
        self.rpc = RpcClient(self.connection, self.publisher, max_bytes=settings.max_message_bytes,
                             timeout_s=settings.rpc_timeout_s)
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Awaitable) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def open(self, fail_fast: bool = True) -> None:
        """Connect; `fail_fast` (a user waiting on a command): one quick probe, then NoBroker in one line."""
        if fail_fast:
            await self.connection.open(backoff=None)
        else:
            await self.connection.open()

    async def close(self) -> None:
        self.rpc.stop()
        self.publisher.closed = True
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.connection.close()
