"""The registry in-process against the real broker: actors register, one that goes silent is called dead and then
forgotten, one that stops deregisters."""

from __future__ import annotations

import asyncio

import pytest

from splitinfer.actors.actor import Actor
from splitinfer.actors.registry.actor import Registry
from splitinfer.actors.registry.client import RegistryClient

from tests.support.broker import fast_settings as _settings
from tests.support.broker import requires_broker
from tests.support.waiting import eventually

pytestmark = [requires_broker, pytest.mark.usefixtures("forget_core_namespace")]


def test_registry_liveness_and_deregister(namespace):
    async def main() -> None:
        s = _settings(namespace)
        reg, a, b, client = Registry("registry", s), Actor("a", s), Actor("b", s), Actor("client", s)
        for x in (reg, a, b, client):
            await x.start()
        try:
            registry = RegistryClient(client.rpc)

            async def registered() -> bool:
                ids = {x.actor_id for x in await registry.who_hosts()}
                assert {"a", "b", "client"} <= ids, ids
                return True

            await eventually(registered, timeout=10, message="a, b and client registered")
            # b goes silent without saying goodbye (its heartbeat task dies as with kill -9)
            for t in list(b.session._tasks):
                t.cancel()

            async def b_called_dead() -> bool:  # dead after 1 s of silence, forgotten after 2 s
                hosts = {x.actor_id: x.alive for x in await registry.who_hosts(include_dead=True)}
                assert hosts.get("b") is False and hosts.get("a") is True, hosts
                return True

            await eventually(b_called_dead, timeout=10, message="the registry calls b dead and a alive")
            assert "b" not in {x.actor_id for x in await registry.who_hosts()}
            await a.stop()  # a deregisters

            async def a_gone() -> bool:
                return "a" not in {x.actor_id for x in await registry.who_hosts(include_dead=True)}

            await eventually(a_gone, timeout=10, message="the registry forgets a once it deregistered")
        finally:
            for x in (client, b, a, reg):
                await x.stop()

    asyncio.run(main())
