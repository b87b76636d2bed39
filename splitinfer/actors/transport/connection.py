"""The connection to the broker: one robust aio-pika connection, its publishing channel (publisher confirms on,
returned messages raised), the namespace's exchanges declared, and throwaway channels for probes.

An actor process connects with the CONNECT backoff (the supervisor may start it before the broker answers); a
user's command or the SDK probes once, briefly, and says in one line that no broker answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Awaitable, Callable

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from yarl import URL

from splitinfer.actors.transport.nodes import NoBroker, broker_answers, broker_urls, masked
from splitinfer.actors.transport.retry import CONNECT, ONCE, RECONNECT_INTERVAL_S, Backoff
from splitinfer.actors.transport.topology import Names, QueuePolicy, declare_core, find_core


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection over the nodes of a cluster: each lost connection or failed attempt moves on to the next
    URL, so an actor whose node is down carries on through a survivor (its channels, queues and consumers restored
    there as aio-pika restores them on any reconnect)."""

    def __init__(self, urls: list[str], start: int = 0, **kwargs):
        self.urls = [URL(u) for u in urls]
        self.current = start % len(self.urls)
        super().__init__(self.urls[self.current], **kwargs)

    def advance(self) -> None:
        if len(self.urls) > 1:
            self.current = (self.current + 1) % len(self.urls)
            self.url = self.urls[self.current]

    async def _on_connection_close(self, closing: asyncio.Future) -> None:
        if not (self._close_called or self.is_closed):
            self.advance()
        await super()._on_connection_close(closing)

    async def _RobustConnection__connect_transport(self) -> None:  # aio-pika's per-attempt step (name-mangled)
        try:
            await super()._RobustConnection__connect_transport()
        except Exception:
            self.advance()
            raise


async def connect_failover(url: str, name: str, start: int = 0) -> FailoverConnection:
    """A robust connection to the first node of `url` that answers, failing over to the others later on."""
    urls = broker_urls(url)
    last: Exception | None = None
    for k in range(len(urls)):
        robust = FailoverConnection(urls, start=start + k, client_properties={"connection_name": name},
                                    reconnect_interval=RECONNECT_INTERVAL_S)
        try:
            await robust.connect()
            return robust
        except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            last = exc
    raise NoBroker(f"no broker at {masked(url)}: {last}")


class Connection:
    """One robust connection and its confirmed publishing channel, with the namespace's exchanges."""

    def __init__(self, url: str, names: Names, name: str, *, prefetch: int, policy: QueuePolicy | None = None):
        self.url = url
        self.names = names
        self.name = name                       # shown by the broker (`rabbitmqctl list_connections`)
        self.prefetch = prefetch
        self.policy = policy or QueuePolicy()
        self.reconnects = 0                    # how often the connection came back after it was lost
        self.lost_at: float | None = None      # loop time of the last loss (what was sent before may be gone)
        self._on_reconnect: list[Callable[[], Awaitable[None]]] = []
        self.robust: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self.exchanges: dict[str, AbstractExchange] = {}
        self._qos = 0
        self._qos_lock = asyncio.Lock()

    async def open(self, backoff: Backoff | None = CONNECT) -> None:
        """Connect (with `backoff`; None: one quick probe first, for a user waiting on a command), open the
        publishing channel, declare the namespace's exchanges, the dead-letter and jobs queues."""
        if backoff is None:
            if not await broker_answers(self.url):
                raise NoBroker(f"no broker answers at {masked(self.url)}; is RabbitMQ running, or is `splitinfer up` "
                               f"using a private one (set SPLITINFER_BROKER_URL)?")
            backoff = ONCE
        last: Exception | None = None
        for attempt in range(backoff.attempts):
            try:
                self.robust = await connect_failover(self.url, self.name)  # every node tried in each attempt
                break
            except NoBroker as exc:
                last = exc
                if attempt + 1 < backoff.attempts:
                    await asyncio.sleep(backoff.delay(attempt + 1))
        else:
            raise NoBroker(str(last))
        self.channel = await self.robust.channel(publisher_confirms=True, on_return_raises=True)
        await self.channel.set_qos(prefetch_count=self.prefetch)
        self._qos = self.prefetch
        self.exchanges = await self._core()
        self.robust.reconnect_callbacks.add(self._reconnected)
        self.robust.close_callbacks.add(self._lost)

    def _lost(self, *_args) -> None:
        self.lost_at = asyncio.get_running_loop().time()

    async def _core(self) -> dict[str, AbstractExchange]:
        """Declare the namespace's exchanges and core queues; a broker user not allowed to (a client's, a server's:
        `splitinfer broker-users`) finds them instead, and is told in one line if the namespace is not set up."""
        async with self.scratch_channel() as probe:
            try:
                await declare_core(probe, self.names, self.policy)
                allowed = True
            except aiormq.exceptions.ChannelAccessRefused:
                allowed = False
        if allowed:
            return await declare_core(self.channel, self.names, self.policy)
        try:
            async with self.scratch_channel() as probe:
                await find_core(probe, self.names)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise NoBroker(f"namespace {self.names.ns!r} is not set up on {masked(self.url)} (its exchanges are "
                           f"missing; this broker user may not create them): start its control plane first") from None
        return await find_core(self.channel, self.names)

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` each time the connection comes back (channels, queues and consumers restored): what was in
        flight as transient messages (tensors) is gone after a broker restart and must be sent again."""
        self._on_reconnect.append(callback)

    async def _reconnected(self, *_args) -> None:
        self.reconnects += 1
        for callback in self._on_reconnect:
            try:
                await callback()
            except Exception as exc:  # a failing hook must not stop the others or the connection
                logging.getLogger("splitinfer").warning("reconnect hook failed: %s", exc)

    @property
    def node(self) -> str:
        """The broker node this connection is on now (a cluster's URL list: the one it failed over to)."""
        return masked(str(self.robust.url)) if self.robust is not None else ""

    @property
    def is_open(self) -> bool:
        return self.channel is not None and not self.channel.is_closed

    async def exchange(self, name: str) -> AbstractExchange:
        """A core exchange by short name ("tensors", "results", "control", "dead"), "" for the default exchange,
        or any exchange by its full name."""
        assert self.channel is not None, "the connection is not open"
        if name == "":
            return self.channel.default_exchange
        ex = self.exchanges.get(name)
        if ex is None:
            ex = self.exchanges[name] = await self.channel.get_exchange(name, ensure=False)
        return ex

    async def set_prefetch(self, limit: int) -> None:
        """basic.qos applies to the consumers started after it: call right before `queue.consume`."""
        assert self.channel is not None
        if limit != self._qos:
            await self.channel.set_qos(prefetch_count=limit)
            self._qos = limit

    @property
    def qos_lock(self) -> asyncio.Lock:
        return self._qos_lock

    async def flush(self, max_turns: int = 16) -> None:
        """Let the connection's writer hand everything queued to the socket: for code about to block the event loop
        (a part computing in it), so that what it published before goes out now, not after."""
        queue = getattr(getattr(getattr(self.robust, "transport", None), "connection", None), "write_queue", None)
        quiet = 0
        for _ in range(max_turns):
            await asyncio.sleep(0)
            quiet = quiet + 1 if queue is None or queue.empty() else 0
            if quiet >= 2:  # the publishers have queued their frames and the writer has taken them all
                return

    @contextlib.asynccontextmanager
    async def scratch_channel(self, on_return_raises: bool = False) -> AsyncIterator[AbstractChannel]:
        """A throwaway channel: a passive declare of a missing queue closes the channel it ran on."""
        assert self.robust is not None
        ch = await self.robust.channel(on_return_raises=on_return_raises)
        try:
            yield ch
        finally:
            if not ch.is_closed:
                with contextlib.suppress(Exception):
                    await ch.close()

    async def close(self) -> None:
        if self.robust is not None:
            with contextlib.suppress(Exception):
                await self.robust.close()
