"""The state pool actor.

Why a pool of its own (and not the registry): the registry answers "who is alive and hosts what" for routing; the
pool is what planning reads (load, speed, slowdown, battery, measured links), and it may be asked often.

Listens on `<ns>.control` for `heartbeat.*` / `register.*` / `deregister.*` (the server and device monitors' state
travels in every heartbeat: messages.ServerState) and `state.link` (LinkReport from the network monitors, one per
directed site pair, newest kept) and `state.hops` (HopReport from the front ends: recent hop timings, the newest
per front end, dropped after HOP_REPORT_TTL_S); answers GetState (key `state_pool.query`, RPC) with ClusterState. Liveness
follows the registry's rule (its LivenessTable).
"""

from __future__ import annotations

import argparse
import time

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.actor import Actor, run_actor
from splitinfer.actors.registry.table import LivenessTable
from splitinfer.actors.transport.topology import Names, declare_control_queue
from splitinfer.config import Settings
from splitinfer.messages import (
    ClusterState,
    Deregister,
    GetState,
    Heartbeat,
    HopReport,
    LinkReport,
    LinkState,
    MessageError,
    Register,
    WhoHosts,
)


HOP_REPORT_TTL_S = 120.0  # a front end that stopped reporting: its old timings say nothing about now


class StatePool(Actor):
    kind = "state_pool"

    def __init__(self, actor_id: str = "state_pool", settings: Settings | None = None):
        super().__init__(actor_id, settings)
        self.table = LivenessTable(self.settings.liveness_timeout_s)
        self.link_states: dict[tuple[str, str], LinkState] = {}
        self.hop_reports: dict[str, tuple[float, HopReport]] = {}

    async def setup(self) -> None:
        q = await declare_control_queue(self.channel, self.names, self.names.state_pool_queue,
                                        ["register.*", "heartbeat.*", "deregister.*", Names.LINK_STATE,
                                         Names.HOP_STATE, Names.STATE_QUERY], self.connection.policy)
        await self.consume(q, self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            msg = self.decode(message, expect=(Register, Heartbeat, Deregister, LinkReport, HopReport,
                                                GetState))
        except MessageError as err:
            await self.dead_letter(message, err)
            return
        if isinstance(msg, GetState):
            await self.rpc.reply(message, self.state(msg))
        elif isinstance(msg, LinkReport):
            link = msg.link
            old = self.link_states.get((link.src_site, link.dst_site))
            if old is None or link.measured_at >= old.measured_at:
                self.link_states[(link.src_site, link.dst_site)] = link
        elif isinstance(msg, HopReport):
            self.hop_reports[msg.source] = (time.monotonic(), msg)
        else:
            self.table.update(msg)
        await self.deliveries.ack(message)

    def state(self, q: GetState) -> ClusterState:
        now = time.monotonic()
        reports = [r for at, r in self.hop_reports.values() if now - at <= HOP_REPORT_TTL_S]
        return ClusterState(actors=self.table.query(WhoHosts(include_dead=q.include_dead)),
                            links=sorted(self.link_states.values(), key=lambda x: (x.src_site, x.dst_site)),
                            hops=[h for r in reports for h in r.hops],
                            latencies=[x for r in reports for x in r.latencies])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splitinfer.actors.state_pool", description=__doc__.splitlines()[0])
    ap.add_argument("--id", default="state_pool")
    args = ap.parse_args(argv)
    run_actor(StatePool(args.id))
