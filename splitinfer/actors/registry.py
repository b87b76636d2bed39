"""Registry: who is alive and what each server hosts.

Listens on `<ns>.control` for `register.*`, `heartbeat.*`, `deregister.*` (from every actor: the base Actor sends
them) and answers WhoHosts queries (key `registry.query`, RPC) with Hosts: each actor's id, kind, site, capacity,
parts hosted (deployment, part, replica/replicas), last state, and whether it is alive (a heartbeat within
settings.liveness_timeout_s, or the actor's own interval x 3 if longer). Deregistered actors are dropped at once;
dead ones are kept (alive=False) until twice the liveness timeout has passed, so `status` can show them.

Helper: `await who_hosts(actor, deployment=None, part=None)` from any actor.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.base import Actor, run_actor
from splitinfer.actors.topology import Names, declare_control_queue
from splitinfer.messages import ActorInfo, Deregister, Heartbeat, Hosts, MessageError, Register, WhoHosts
from splitinfer.settings import Settings


class Registry(Actor):
    kind = "registry"

    def __init__(self, actor_id: str = "registry", settings: Settings | None = None):
        super().__init__(actor_id, settings)
        self.actors: dict[str, ActorInfo] = {}
        self.intervals: dict[str, float] = {}

    async def setup(self) -> None:
        q = await declare_control_queue(self.channel, self.names, self.names.registry_queue,
                                        ["register.*", "heartbeat.*", "deregister.*", Names.REGISTRY_QUERY],
                                        expires_s=self.settings.queue_expires_s)
        await self.consume(q, self._on_message)
        self.spawn(self._watch(), name="liveness")

    async def _watch(self) -> None:
        """Notice (and log) dead actors even when nobody asks."""
        while not self.stopping:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            self.refresh()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            msg = self.decode(message, expect=(Register, Heartbeat, Deregister, WhoHosts))
        except MessageError as err:
            await self.dead_letter(message, err)
            return
        if isinstance(msg, WhoHosts):
            await self.reply(message, self.query(msg))
        else:
            self.update(msg)
        await self.ack(message)

    def update(self, msg: Register | Heartbeat | Deregister) -> None:
        now = time.time()
        if isinstance(msg, Deregister):
            if self.actors.pop(msg.actor_id, None) is not None:
                self.log("deregistered", actor_id=msg.actor_id, reason=msg.reason)
            return
        info = self.actors.get(msg.actor_id)
        new = info is None
        info = info or ActorInfo(actor_id=msg.actor_id, kind=msg.kind)
        info.kind, info.site, info.capacity, info.parts = msg.kind, msg.site, msg.capacity, list(msg.parts)
        info.last_seen = now
        info.alive = True
        if isinstance(msg, Heartbeat):
            info.state = msg.state
            self.intervals[msg.actor_id] = msg.interval_s
        self.actors[msg.actor_id] = info
        if new:
            self.log("registered", actor_id=msg.actor_id, actor_kind=msg.kind, site=msg.site,
                     parts=[f"{p.deployment}/{p.part}@{p.replica}/{p.replicas}" for p in msg.parts])

    def _timeout(self, actor_id: str) -> float:
        return max(self.settings.liveness_timeout_s, 3 * self.intervals.get(actor_id, 0.0))

    def refresh(self) -> None:
        now = time.time()
        for aid, info in list(self.actors.items()):
            age = now - info.last_seen
            alive = age <= self._timeout(aid)
            if info.alive and not alive:
                self.log.warning("actor_dead", actor_id=aid, silent_s=round(age, 1))
            info.alive = alive
            if age > 2 * self._timeout(aid):
                del self.actors[aid]

    def query(self, q: WhoHosts) -> Hosts:
        self.refresh()
        out = []
        for info in self.actors.values():
            if not info.alive and not q.include_dead:
                continue
            if q.deployment is not None or q.part is not None:
                parts = [p for p in info.parts if (q.deployment is None or p.deployment == q.deployment)
                         and (q.part is None or p.part == q.part)]
                if not parts:
                    continue
            out.append(info)
        return Hosts(actors=sorted(out, key=lambda a: a.actor_id))


async def who_hosts(actor: Actor, deployment: str | None = None, part: str | None = None,
                    include_dead: bool = False) -> Hosts:
    r = await actor.rpc(Names.REGISTRY_QUERY, WhoHosts(deployment=deployment, part=part, include_dead=include_dead))
    if not isinstance(r, Hosts):
        raise RuntimeError(f"registry answered {r.TYPE}, not hosts")
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splitinfer.actors.registry", description=__doc__.splitlines()[0])
    ap.add_argument("--id", default="registry")
    args = ap.parse_args(argv)
    run_actor(Registry(args.id))


if __name__ == "__main__":
    main()
