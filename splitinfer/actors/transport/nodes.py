"""Where the broker is: one node's URL, or every node of a cluster separated by commas; the URLs without their
credentials for logs; a plain connection to the first node that answers (short admin work; actors hold a robust
one, `connection.FailoverConnection`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from urllib.parse import urlsplit, urlunsplit

import aio_pika

from splitinfer.actors.transport.log import first_line
from splitinfer.actors.transport.retry import CLIENT_CONNECT_TIMEOUT_S


class NoBroker(ConnectionError):
    """No broker answered at the URL (the message says where, without credentials)."""


def broker_urls(url: str) -> list[str]:
    """The URLs in a broker setting: one, or every node of a cluster separated by commas (tried in turn)."""
    urls = [u.strip() for u in url.split(",") if u.strip()]
    if not urls:
        raise ValueError("no broker URL given")
    return urls


def is_local_url(url: str) -> bool:
    """A broker URL of this machine (its own rabbitmqctl sees that broker)."""
    host = urlsplit(url).hostname or "localhost"
    return host in ("localhost", "127.0.0.1", "::1", socket.gethostname())


def masked(url: str) -> str:
    """The URL (or the comma-separated URLs) without credentials, for messages and logs."""
    def one(u: str) -> str:
        parts = urlsplit(u)
        host = f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))

    return ",".join(one(u) for u in broker_urls(url))


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


async def connect_once(url: str, timeout: float = CLIENT_CONNECT_TIMEOUT_S) -> aio_pika.abc.AbstractConnection:
    """A plain (not robust) connection to the first node of `url` that accepts one: for short admin work."""
    last: Exception | None = None
    for one in broker_urls(url):
        try:
            return await asyncio.wait_for(aio_pika.connect(one, timeout=timeout), timeout + 1)
        except Exception as exc:
            last = exc
    raise NoBroker(f"no broker answers at {masked(url)}: {first_line(last)}")


async def broker_answers(url: str, timeout: float = CLIENT_CONNECT_TIMEOUT_S) -> bool:
    """True if an AMQP broker (any node of a cluster URL list) accepts a connection: a real AMQP handshake."""
    with quiet_amqp_logs():
        try:
            conn = await connect_once(url, timeout)
        except NoBroker:
            return False
    await conn.close()
    return True

