"""How an actor shows itself on `<ns>.control`: `register.<id>` at start and whenever what it hosts changes, a
`heartbeat.<id>` with its monitored state every settings.heartbeat_interval_s, `deregister.<id>` at stop. The
registry, the state pool and the front ends listen; nobody is asked."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Awaitable, Protocol

from splitinfer.actors.transport import Logger, Names, Publisher, first_line
from splitinfer.actors.transport.retry import ONCE
from splitinfer.config import Settings
from splitinfer.messages import Deregister, Heartbeat, PartRef, Register, ServerState


class Present(Protocol):
    """What shows itself: an actor's identity, what it hosts, its state, and its publisher."""

    id: str
    kind: str
    site: str
    capacity: float
    settings: Settings
    names: Names
    publisher: Publisher
    log: Logger

    @property
    def stopping(self) -> bool: ...

    def hosted_parts(self) -> list[PartRef]: ...

    async def heartbeat_state(self) -> ServerState: ...

    def spawn(self, coro: Awaitable, name: str = "") -> asyncio.Task: ...


class Presence:
    def __init__(self, actor: Present):
        self.actor = actor
        self.last_beat: float | None = None  # monotonic time of the last heartbeat that went out

    def age(self) -> float:
        """Seconds since the last heartbeat went out (NaN before the first)."""
        return float("nan") if self.last_beat is None else time.monotonic() - self.last_beat

    def registration(self) -> Register:
        a = self.actor
        return Register(actor_id=a.id, kind=a.kind, site=a.site, capacity=a.capacity, parts=a.hosted_parts(),
                        host=socket.gethostname(), pid=os.getpid())

    async def announce(self) -> None:
        """Register (again): at start, and at once when the parts an actor hosts change."""
        a = self.actor
        await a.publisher.publish("control", a.names.register_key(a.id), self.registration(), mandatory=False)

    async def start(self) -> None:
        await self.announce()
        self.actor.spawn(self._loop(), name="heartbeat")

    async def beat(self) -> None:
        a = self.actor
        hb = Heartbeat(actor_id=a.id, kind=a.kind, site=a.site, capacity=a.capacity, parts=a.hosted_parts(),
                       state=await a.heartbeat_state(), interval_s=a.settings.heartbeat_interval_s)
        await a.publisher.publish("control", a.names.heartbeat_key(a.id), hb, mandatory=False,
                                  backoff=ONCE)
        self.last_beat = time.monotonic()

    async def _loop(self) -> None:
        a = self.actor
        while not a.stopping:
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                a.log.warning("heartbeat_failed", error=first_line(exc))
            await asyncio.sleep(a.settings.heartbeat_interval_s)

    async def leave(self) -> None:
        a = self.actor
        with contextlib.suppress(Exception):
            await asyncio.wait_for(a.publisher.publish("control", a.names.deregister_key(a.id),
                                                       Deregister(actor_id=a.id, reason="stop"), mandatory=False),
                                   2.0)
