"""An actor in-process against the real broker: a handler that raises gives an error result and a dead letter
and the actor keeps going; an RPC whose answer never comes fails with Stopped when the caller stops."""

from __future__ import annotations

import asyncio

import pytest

from splitinfer.actors.actor import Actor
from splitinfer.actors.transport import Stopped
from splitinfer.messages import ErrorResult, Reply, decode

from tests.support.broker import fast_settings as _settings
from tests.support.broker import requires_broker
from tests.support.waiting import eventually

pytestmark = [requires_broker, pytest.mark.usefixtures("forget_core_namespace")]


def test_rpc_fails_pending_on_stop_and_handler_errors_are_dead_lettered(namespace):
    async def main() -> None:
        s = _settings(namespace)
        silent = Actor("silent", s)

        async def boom(message):
            raise RuntimeError("handler bug")

        listener = Actor("listener", s)
        await silent.start()
        await listener.start()
        try:
            q = await silent.channel.declare_queue(f"{namespace}.boom", auto_delete=True,
                                                   arguments={"x-dead-letter-exchange": silent.names.dead})
            await q.bind(silent.exchanges["control"], "boom")
            await silent.consume(q, boom)
            errors = await listener.channel.declare_queue(exclusive=True)
            await errors.bind(listener.exchanges["results"], "#")
            # a handler that raises: error result + dead letter, and the actor keeps going
            await listener.publisher.publish("control", "boom", Reply(message="x"), headers={"request_id": "job-7"})
            got = await _get(errors)
            err = decode(got.body)
            assert isinstance(err, ErrorResult) and err.job_id == "job-7" and err.code == "internal"
            assert "handler bug" in err.message and err.where == "silent"
            dead = await listener.channel.declare_queue(listener.names.dead, passive=True)
            assert (await _get(dead)).headers["request_id"] == "job-7"
            # an RPC whose answer never comes fails with Stopped when the caller stops (no hang)
            hang = await listener.channel.declare_queue(f"{namespace}.nobody", auto_delete=True)
            await hang.bind(listener.exchanges["control"], "nobody.home")
            waiter = asyncio.ensure_future(listener.rpc.call("nobody.home", Reply(), timeout=30))

            async def request_waits_in_its_queue() -> bool:  # the call is out, waiting for an answer
                return (await hang.declare()).message_count >= 1

            await eventually(request_waits_in_its_queue, timeout=10, message="the RPC request reached nobody.home")
            await listener.stop()
            with pytest.raises(Stopped):
                await asyncio.wait_for(waiter, 5)
        finally:
            await silent.stop()
            await listener.stop()

    asyncio.run(main())


async def _get(queue, timeout: float = 5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        m = await queue.get(no_ack=True, fail=False)
        if m is not None:
            return m
        assert asyncio.get_running_loop().time() < deadline, f"nothing arrived on {queue.name}"
        await asyncio.sleep(0.05)


def test_a_node_that_does_not_answer_is_passed_over_for_the_next(namespace):
    """A cluster's URL list whose first node is down: the actor connects to the next one and says which."""
    import socket

    from splitinfer.actors.transport import masked
    from tests.support.broker import BROKER

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"amqp://guest:guest@127.0.0.1:{s.getsockname()[1]}/"

    async def main() -> str:
        actor = Actor("failover", _settings(namespace).model_copy(update={"broker_url": f"{dead},{BROKER}"}))
        await actor.start()
        try:
            return actor.connection.node
        finally:
            await actor.stop()

    assert asyncio.run(main()) == masked(BROKER)
