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

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.messages import TensorMessage


@dataclass
class Pending:
    """A join's inputs received so far for one request."""

    request_id: str
    tensors: dict[str, TensorMessage] = field(default_factory=dict)
    messages: dict[str, AbstractIncomingMessage] = field(default_factory=dict)
    received: dict[str, float] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    queue: int = 0  # replica queue the inputs came from (all of a request's inputs hash to the same one)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


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

    def add(self, msg: TensorMessage, message: AbstractIncomingMessage, now: float, queue: int
            ) -> tuple[Pending, bool, AbstractIncomingMessage | None]:
        """Take one input in: (its request's Pending, whether it is new, the earlier delivery of this same input
        if it came twice: a redelivery after a channel loss, settled by the caller). A complete request leaves the
        buffer (`Pending` has all inputs)."""
        pend = self.pending.get(msg.request_id)
        new = pend is None
        if new:
            pend = self.pending[msg.request_id] = Pending(msg.request_id, queue=queue)
        old = pend.messages.get(msg.tensor)
        pend.tensors[msg.tensor] = msg
        pend.messages[msg.tensor] = message
        pend.received[msg.tensor] = now
        if self.complete(pend):
            self.pending.pop(msg.request_id, None)
            pend.cancel_timer()
        return pend, new, old

    def complete(self, pend: Pending) -> bool:
        return len(pend.tensors) == len(self.inputs)

    def missing(self, pend: Pending) -> list[str]:
        return [t for t in self.inputs if t not in pend.tensors]

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
