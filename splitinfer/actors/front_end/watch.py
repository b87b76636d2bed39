"""The front end's view of the servers, from the heartbeats every actor publishes."""

from __future__ import annotations

import time
from typing import Any


class ServerWatch:
    """Which servers are down (no heartbeat within the liveness timeout, or deregistered) and their last state:
    the front end's own view, from the heartbeats every actor publishes, so a plan choice needs no RPC."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        self.seen: dict[str, tuple[float, Any]] = {}
        self.gone: set[str] = set()

    def heartbeat(self, actor_id: str, state, now: float | None = None) -> None:
        self.seen[actor_id] = (time.monotonic() if now is None else now, state)
        self.gone.discard(actor_id)

    def deregister(self, actor_id: str) -> None:
        self.gone.add(actor_id)

    def down(self, servers, now: float | None = None) -> set[str]:
        """Of `servers`, those not heard from lately; one never heard from counts as down once this watch has run
        for a liveness timeout (before that, the front end may just have started). A plan table's stand-in client
        (`client@<site>`) is not a process and never down."""
        now = time.monotonic() if now is None else now
        out = set()
        for s in servers:
            if s.startswith("client@"):
                continue
            last = self.seen.get(s)
            if s in self.gone or (last is None and now - self.started > self.timeout_s) or \
                    (last is not None and now - last[0] > self.timeout_s):
                out.add(s)
        return out

    def battery(self, actor_id: str) -> float | None:
        last = self.seen.get(actor_id)
        return None if last is None else getattr(last[1], "battery", None)
