"""What the front end and the Client know of the servers, from the heartbeats every actor publishes: who is down,
who hosts which deployment, the device's battery; and the choice of a plan per job from a model's plan table, so
that choosing needs no RPC and both choose alike."""

from __future__ import annotations

import time
from typing import Any

from splitinfer.messages import Requirements, plan_deployment_name
from splitinfer.planner import PlanError, PlanTable, choose_plan


class ServerWatch:
    """Which servers are down (no heartbeat within the liveness timeout, or deregistered), what they host, and
    their last state."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        self.seen: dict[str, tuple[float, Any]] = {}
        self.hosting: dict[str, set[str]] = {}  # actor -> deployments it hosts a part of
        self.gone: set[str] = set()

    def heartbeat(self, actor_id: str, state, now: float | None = None, parts=()) -> None:
        self.seen[actor_id] = (time.monotonic() if now is None else now, state)
        self.hosting[actor_id] = {p.deployment for p in parts}
        self.gone.discard(actor_id)

    def seed(self, actors, now: float | None = None) -> None:
        """Start from the registry's view (a watch that just started has heard nobody yet): the live ones as just
        heard from, the dead as gone, and anyone else unknown counts as down from now on."""
        now = time.monotonic() if now is None else now
        for a in actors:
            if a.alive:
                self.seen[a.actor_id] = (now, a.state)
                self.hosting[a.actor_id] = {p.deployment for p in a.parts}
            else:
                self.gone.add(a.actor_id)
        self.started = min(self.started, now - self.timeout_s - 1e-3)

    def reheard(self, now: float | None = None) -> None:
        """Our connection was lost: the missing heartbeats were our deafness. Every server known counts as just
        heard (a liveness timeout to speak again)."""
        now = time.monotonic() if now is None else now
        self.seen = {a: (max(t, now), state) for a, (t, state) in self.seen.items()}

    def registered(self, actor_id: str, parts=()) -> None:
        """A registration (at start, and whenever what it hosts changes): what it hosts now, at once."""
        self.hosting[actor_id] = {p.deployment for p in parts}
        self.gone.discard(actor_id)

    def deregister(self, actor_id: str) -> None:
        self.gone.add(actor_id)
        self.hosting.pop(actor_id, None)

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

    def hosted(self, deployment: str, now: float | None = None) -> bool | None:
        """Whether a live server hosts a part of the deployment; None before the watch has heard a full round."""
        now = time.monotonic() if now is None else now
        if now - self.started <= self.timeout_s:
            return None
        live = [a for a, (t, _) in self.seen.items() if now - t <= self.timeout_s and a not in self.gone]
        return any(deployment in self.hosting.get(a, ()) for a in live)

    def battery(self, actor_id: str) -> float | None:
        last = self.seen.get(actor_id)
        return None if last is None else getattr(last[1], "battery", None)


def route(deployment: str, table: PlanTable | None, requirements: Requirements, watch: ServerWatch
          ) -> tuple[str, str | None, tuple[str, str] | None]:
    """(deployment to send to, plan id, None) or (.., .., (code, reason)). A model deployment's plan comes from its
    table by the job's requirements, with the device's reported battery when the job gives none, avoiding servers
    that stopped heartbeating (the fallback when a server of the best plan is down)."""
    if table is None:
        return deployment, None, None
    battery = requirements.battery if requirements.battery is not None else watch.battery(table.client)
    try:
        plan = choose_plan(table, requirements.max_latency_s, battery, requirements.min_fidelity,
                           watch.down(table.servers), min_accuracy=requirements.min_accuracy)
    except PlanError as exc:
        return deployment, None, ("no_plan", str(exc))
    return plan_deployment_name(deployment, plan.id), plan.id, None
