"""The liveness table: every actor's last Register/Heartbeat, alive while its heartbeats keep coming. Pure.

An actor is alive while its last word is younger than settings.liveness_timeout_s (or three of its own heartbeat
intervals, if longer). A deregistered actor is dropped at once; a silent one is kept (alive=False) until twice
its timeout has passed, so `status` can show it.
"""

from __future__ import annotations

import time

from splitinfer.messages import ActorInfo, Deregister, Heartbeat, Register, WhoHosts


class LivenessTable:
    def __init__(self, liveness_timeout_s: float):
        self.liveness_timeout_s = liveness_timeout_s
        self.actors: dict[str, ActorInfo] = {}
        self.intervals: dict[str, float] = {}

    def update(self, msg: Register | Heartbeat | Deregister, now: float | None = None) -> str | None:
        """Take the message in; returns "registered" / "deregistered" when an actor appears or leaves."""
        now = time.time() if now is None else now
        if isinstance(msg, Deregister):
            self.intervals.pop(msg.actor_id, None)
            return "deregistered" if self.actors.pop(msg.actor_id, None) is not None else None
        old = self.actors.get(msg.actor_id)
        state = msg.state if isinstance(msg, Heartbeat) else (old.state if old else None)
        self.actors[msg.actor_id] = ActorInfo(
            actor_id=msg.actor_id, kind=msg.kind, site=msg.site, capacity=msg.capacity, parts=list(msg.parts),
            last_seen=now, alive=True, **({"state": state} if state is not None else {}))
        if isinstance(msg, Heartbeat):
            self.intervals[msg.actor_id] = msg.interval_s
        return "registered" if old is None else None

    def reheard(self, now: float | None = None) -> None:
        """We were cut off (our connection to the broker was lost): the silence was ours, not theirs. Every actor
        known counts as just heard, and has a liveness timeout to speak again."""
        now = time.time() if now is None else now
        self.actors = {aid: info.model_copy(update={"last_seen": max(info.last_seen, now)})
                       for aid, info in self.actors.items()}

    def timeout(self, actor_id: str) -> float:
        return max(self.liveness_timeout_s, 3 * self.intervals.get(actor_id, 0.0))

    def refresh(self, now: float | None = None) -> list[str]:
        """Mark the silent dead, forget the long silent; returns the ids that just died."""
        now = time.time() if now is None else now
        died = []
        for aid, info in list(self.actors.items()):
            age = now - info.last_seen
            alive = age <= self.timeout(aid)
            if info.alive and not alive:
                died.append(aid)
            if age > 2 * self.timeout(aid):
                del self.actors[aid]
                self.intervals.pop(aid, None)
            elif alive != info.alive:
                self.actors[aid] = info.model_copy(update={"alive": alive})
        return died

    def query(self, q: WhoHosts, now: float | None = None) -> list[ActorInfo]:
        self.refresh(now)
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
        return sorted(out, key=lambda a: a.actor_id)
