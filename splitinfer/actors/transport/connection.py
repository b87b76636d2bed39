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
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from splitinfer.actors.transport.retry import CLIENT_CONNECT_TIMEOUT_S, CONNECT, ONCE, RECONNECT_INTERVAL_S, Backoff
from splitinfer.actors.transport.topology import Names, QueuePolicy, declare_core


def masked(url: str) -> str:
    """The URL without its credentials, for messages and logs."""
    parts = urlsplit(url)
    host = f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@contextlib.contextmanager
def quiet_amqp_logs():
    """A refused probe is an answer we report, not a log line of aio-pika's."""
    loggers = [logging.getLogger(n) for n in ("aiormq", "aio_pika")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


async def broker_answers(url: str, timeout: float = CLIENT_CONNECT_TIMEOUT_S) -> bool:
    """True if an AMQP broker accepts a connection at url (a real AMQP handshake, not just an open port)."""
    with quiet_amqp_logs():
        try:
            conn = await asyncio.wait_for(aio_pika.connect(url, timeout=timeout), timeout + 1)
        except Exception:
            return False
    await conn.close()
    return True


class NoBroker(ConnectionError):
    """No broker answered at the URL (the message says where, without credentials)."""


class Connection:
    """One robust connection and its confirmed publishing channel, with the namespace's exchanges."""

    def __init__(self, url: str, names: Names, name: str, *, prefetch: int, policy: QueuePolicy | None = None):
        self.url = url
        self.names = names
        self.name = name                       # shown by the broker (`rabbitmqctl list_connections`)
        self.prefetch = prefetch
        self.policy = policy or QueuePolicy()
        self.reconnects = 0                    # how often the connection came back after it was lost
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
                self.robust = await aio_pika.connect_robust(self.url, client_properties={"connection_name": self.name},
                                                            reconnect_interval=RECONNECT_INTERVAL_S)
                break
            except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
                last = exc
                if attempt + 1 < backoff.attempts:
                    await asyncio.sleep(backoff.delay(attempt + 1))
        else:
            raise NoBroker(f"no broker at {masked(self.url)}: {last}")
        self.channel = await self.robust.channel(publisher_confirms=True, on_return_raises=True)
        await self.channel.set_qos(prefetch_count=self.prefetch)
        self._qos = self.prefetch
        self.exchanges = await declare_core(self.channel, self.names, self.policy)
        self.robust.reconnect_callbacks.add(self._reconnected)

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
