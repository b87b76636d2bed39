"""Joins: a part with several inputs gathers a request's inputs by request id and runs it only once all are here.

The buffer is bounded (settings.join_buffer requests per part): a new request beyond it evicts the oldest partial
one, which gets an error result. A request whose inputs do not all arrive within settings.join_timeout_s gets one
too (the actor keeps the timers). Every input of a request hashes to the same replica queue, so a join's inputs
meet in one process; `from_queue(k)` gives back what came from replica queue k when its owner returns.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aio_pika.abc import AbstractIncomingMessage


@dataclass
class Arrival:
    """One delivery of some of a request's inputs."""

    arrays: dict[str, np.ndarray]
    message: AbstractIncomingMessage
    meta: dict[str, Any]
    received: float            # wall clock
    transfer_s: float          # its sender's clock to ours
    deadline: float | None     # loop time


@dataclass
class Pending:
    """A join's inputs received so far for one request."""

    request_id: str
    arrivals: dict[str, Arrival] = field(default_factory=dict)   # input name -> the delivery that brought it
    timer: asyncio.TimerHandle | None = None
    queue: int = 0  # replica queue the inputs came from (all of a request's inputs hash to the same one)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    @property
    def messages(self) -> list[AbstractIncomingMessage]:
        """Each delivery once (one frame may bring several inputs)."""
        return list({id(a.message): a.message for a in self.arrivals.values()}.values())


class JoinBuffer:
    def __init__(self, inputs: list[str], capacity: int):
        self.inputs = list(inputs)
        self.capacity = max(1, capacity)
        self.pending: collections.OrderedDict[str, Pending] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.pending)

    def evict_for_new(self, request_id: str) -> list[Pending]:
        """Room for a new request: the oldest partial requests that must go (empty if it is known or fits)."""
        evicted = []
        if request_id not in self.pending:
            while self.pending and len(self.pending) >= self.capacity:
                evicted.append(self.pending.popitem(last=False)[1])
        return evicted

    def add(self, request_id: str, arrival: Arrival, queue: int
            ) -> tuple[Pending, bool, list[AbstractIncomingMessage]]:
        """Take a delivery's inputs in: (the request's Pending, whether it is new, earlier deliveries of these same
        inputs that this one replaces: a redelivery after a channel loss, for the caller to settle). A complete
        request leaves the buffer."""
        pend = self.pending.get(request_id)
        new = pend is None
        if new:
            pend = self.pending[request_id] = Pending(request_id, queue=queue)
        replaced = {id(pend.arrivals[n].message): pend.arrivals[n].message
                    for n in arrival.arrays if n in pend.arrivals}
        for name in arrival.arrays:
            pend.arrivals[name] = arrival
        still = {id(a.message) for a in pend.arrivals.values()}
        if self.complete(pend):
            self.pending.pop(request_id, None)
            pend.cancel_timer()
        return pend, new, [m for k, m in replaced.items() if k not in still]

    def complete(self, pend: Pending) -> bool:
        return all(n in pend.arrivals for n in self.inputs)

    def missing(self, pend: Pending) -> list[str]:
        return [t for t in self.inputs if t not in pend.arrivals]

    def pop(self, request_id: str) -> Pending | None:
        pend = self.pending.pop(request_id, None)
        if pend is not None:
            pend.cancel_timer()
        return pend

    def from_queue(self, queue: int) -> list[Pending]:
        """Take out every partial request whose inputs came from replica queue `queue`."""
        out = [p for p in self.pending.values() if p.queue == queue]
        for p in out:
            self.pop(p.request_id)
        return out

    def clear(self) -> list[Pending]:
        out = list(self.pending.values())
        for p in out:
            p.cancel_timer()
        self.pending.clear()
        return out
