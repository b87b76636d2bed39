"""A session with the broker: a connection, a publisher and an RPC client, and the tasks they start, closed
together. The SDK's Client and the supervisor use one as it is; every actor is built on one (adding deliveries,
consumers, presence and a worker thread)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable

from splitinfer.actors.transport.connection import Connection
from splitinfer.actors.transport.log import Logger, first_line
from splitinfer.actors.transport.publisher import Publisher
from splitinfer.actors.transport.rpc import RpcClient
from splitinfer.actors.transport.topology import Names, QueuePolicy
from splitinfer.config import Settings


class Session:
    def __init__(self, settings: Settings, name: str, log: Logger | None = None):
        """`name` shows in the broker's connection list (as `<name>@<namespace>`); without a `log`, silent."""
        self.settings = settings
        self.names = Names(settings.namespace)
        self.log = log or Logger.silent(name, "session")
        self.connection = Connection(settings.broker_url, self.names, f"{name}@{self.names.ns}",
                                     prefetch=settings.prefetch, policy=QueuePolicy.from_settings(settings))
        self.publisher = Publisher(self.connection, self.log, self.spawn)
        self.rpc = RpcClient(self.connection, self.publisher, max_bytes=settings.max_message_bytes,
                             timeout_s=settings.rpc_timeout_s)
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Awaitable, name: str = "") -> asyncio.Task:
        """A background task, cancelled at close; one that fails is logged (nobody awaits it)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("task_failed", error=first_line(task.exception()))

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
