"""The registry actor: listens on `<ns>.control` for `register.*`, `heartbeat.*`, `deregister.*` (every actor's
presence) and answers WhoHosts (key `registry.query`, RPC) with Hosts from its liveness table."""

from __future__ import annotations

import argparse
import asyncio

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.actor import Actor, run_actor
from splitinfer.actors.registry.table import LivenessTable
from splitinfer.actors.transport.topology import Names, declare_control_queue
from splitinfer.config import Settings
from splitinfer.messages import Deregister, Heartbeat, Hosts, MessageError, Register, WhoHosts


class Registry(Actor):
    kind = "registry"

    def __init__(self, actor_id: str = "registry", settings: Settings | None = None):
        super().__init__(actor_id, settings)
        self.table = LivenessTable(self.settings.liveness_timeout_s)

    async def setup(self) -> None:
        q = await declare_control_queue(self.channel, self.names, self.names.registry_queue,
                                        ["register.*", "heartbeat.*", "deregister.*", Names.REGISTRY_QUERY],
                                        self.connection.policy)
        await self.consume(q, self._on_message)
        self.spawn(self._watch(), name="liveness")
        self.connection.on_reconnect(self._reheard)

    async def _reheard(self) -> None:
        self.table.reheard()

    async def _watch(self) -> None:
        """Notice (and log) dead actors even when nobody asks."""
        while not self.stopping:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            for aid in self.table.refresh():
                self.log.warning("actor_dead", actor_id=aid)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            msg = self.decode(message, expect=(Register, Heartbeat, Deregister, WhoHosts))
        except MessageError as err:
            await self.dead_letter(message, err)
            return
        if isinstance(msg, WhoHosts):
            await self.rpc.reply(message, Hosts(actors=self.table.query(msg)))
        else:
            change = self.table.update(msg)
            if change == "registered":
                self.log("registered", actor_id=msg.actor_id, actor_kind=msg.kind, site=msg.site,
                         parts=[f"{p.deployment}/{p.part}@{p.replica}/{p.replicas}" for p in msg.parts])
            elif change == "deregistered":
                self.log("deregistered", actor_id=msg.actor_id, reason=msg.reason)
        await self.deliveries.ack(message)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splitinfer.actors.registry", description=__doc__.splitlines()[0])
    ap.add_argument("--id", default="registry")
    args = ap.parse_args(argv)
    run_actor(Registry(args.id))
