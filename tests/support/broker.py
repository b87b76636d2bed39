"""The real broker the tests run against: whether it answers (asked once per run), the skip mark for files that
need it, and in-process actor settings and clean-up for the integration tests."""

from __future__ import annotations

import asyncio

import pytest

from splitinfer.config import Settings

BROKER = Settings().broker_url


def free_port() -> int:
    """A port nothing listens on now (for a private broker node, a listener, a dead URL)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_up(url: str = BROKER, timeout: float = 3.0) -> bool:
    from splitinfer.actors.supervisor import broker_answers

    return broker_answers(url, timeout=timeout)


BROKER_UP = broker_up()

# `pytestmark = requires_broker` in a test module (or `@requires_broker` on one test)
requires_broker = pytest.mark.skipif(not BROKER_UP, reason=f"no RabbitMQ at {BROKER}")


def fast_settings(ns: str, **kw) -> Settings:
    """In-process actors with short heartbeats: the registry calls one dead after 1 s of silence."""
    return Settings(namespace=ns, queue_expires_s=120, heartbeat_interval_s=0.3, liveness_timeout_s=1.0, **kw)


def delete_core_topology(ns: str) -> None:
    """Delete a namespace's core exchanges and queues (what in-process actors declare)."""
    import aio_pika

    from splitinfer.actors.transport.topology import Names

    async def run() -> None:
        n = Names(ns)
        conn = await aio_pika.connect(BROKER)
        async with conn:
            ch = await conn.channel()
            for q in (n.pool_queue, n.registry_queue, n.dead, n.jobs):
                await ch.queue_delete(q)
            for ex in (n.tensors, n.results, n.control, n.dead):
                await ch.exchange_delete(ex)

    asyncio.run(run())
