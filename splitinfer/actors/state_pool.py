"""State pool: the latest state of every server, device and link, for the optimizer and the front end.

Why a pool of its own (and not the registry): the registry answers "who is alive and hosts what" for routing;
the pool is what plan choice reads (load, speed, slowdown, battery, measured links), and it may be asked often.

Listens on `<ns>.control` for `heartbeat.*` / `register.*` / `deregister.*` (the server and device monitors'
state travels in every heartbeat: messages.ServerState) and `state.link` (LinkReport from the network monitors,
one per directed site pair, newest kept); answers GetState (key `state_pool.query`, RPC) with ClusterState.
Liveness follows the registry's rule (a heartbeat within settings.liveness_timeout_s).

Helper: `await get_state(actor)` from any actor (the Client has `cluster_state()`).
"""

from __future__ import annotations

import argparse

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.base import Actor, run_actor
from splitinfer.actors.registry import Registry
from splitinfer.actors.topology import Names, declare_control_queue
from splitinfer.messages import (
    ClusterState,
    Deregister,
    GetState,
    Heartbeat,
    LinkReport,
    LinkState,
    MessageError,
    Register,
    WhoHosts,
)
from splitinfer.settings import Settings


class StatePool(Registry):
    kind = "state_pool"

    def __init__(self, actor_id: str = "state_pool", settings: Settings | None = None):
        super().__init__(actor_id, settings)
        self.link_states: dict[tuple[str, str], LinkState] = {}

    async def setup(self) -> None:
        q = await declare_control_queue(self.channel, self.names, self.names.state_pool_queue,
                                        ["register.*", "heartbeat.*", "deregister.*", Names.LINK_STATE,
                                         Names.STATE_QUERY],
                                        expires_s=self.settings.queue_expires_s)
        await self.consume(q, self._on_message)
        self.spawn(self._watch(), name="liveness")

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            msg = self.decode(message, expect=(Register, Heartbeat, Deregister, LinkReport, GetState))
        except MessageError as err:
            await self.dead_letter(message, err)
            return
        if isinstance(msg, GetState):
            await self.reply(message, self.state(msg))
        elif isinstance(msg, LinkReport):
            link = msg.link
            old = self.link_states.get((link.src_site, link.dst_site))
            if old is None or link.measured_at >= old.measured_at:
                self.link_states[(link.src_site, link.dst_site)] = link
        else:
            self.update(msg)
        await self.ack(message)

    def state(self, q: GetState) -> ClusterState:
        hosts = self.query(WhoHosts(include_dead=q.include_dead))
        return ClusterState(actors=hosts.actors, links=sorted(self.link_states.values(),
                                                              key=lambda x: (x.src_site, x.dst_site)))


async def get_state(actor: Actor, include_dead: bool = False, timeout: float | None = None) -> ClusterState:
    r = await actor.rpc(Names.STATE_QUERY, GetState(include_dead=include_dead), timeout=timeout)
    if not isinstance(r, ClusterState):
        raise RuntimeError(f"state pool answered {r.TYPE}, not cluster_state")
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splitinfer.actors.state_pool", description=__doc__.splitlines()[0])
    ap.add_argument("--id", default="state_pool")
    args = ap.parse_args(argv)
    run_actor(StatePool(args.id))


if __name__ == "__main__":
    main()
