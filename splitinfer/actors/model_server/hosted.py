"""One part a model server hosts: its compiled function, replica, queues and consumers, joins, the requests it is
running and the ones it has served (a bounded memory, so a redelivered input is acked without recomputing)."""

from __future__ import annotations

import collections
import re

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from splitinfer.actors.model_server.joins import JoinBuffer
from splitinfer.actors.model_server.runner import EmulatedSlowdown
from splitinfer.messages import PartRef
from splitinfer.splitter.manifest import PartEntry


class HostedPart:
    def __init__(self, deployment: str, entry: PartEntry, compiled, replica: int, replicas: int, *,
                 done_cache: int, join_buffer: int, slowdown: float):
        self.deployment = deployment
        self.entry = entry
        self.name = entry.name
        self.compiled = compiled
        self.replica = replica
        self.replicas = replicas
        self.inputs = {t.name: t for t in entry.inputs}
        self.outputs = list(entry.outputs)
        self.joins = JoinBuffer(list(self.inputs), join_buffer)
        self.done: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.done_cache = done_cache
        # requests queued or running here -> further deliveries of their inputs (a redelivery after a channel
        # loss), settled together with the original instead of computing the request twice
        self.running: dict[str, list[AbstractIncomingMessage]] = {}
        self.queues: list[AbstractQueue] = []
        self.tags: list[tuple[AbstractQueue, str]] = []
        self.standby_tags: dict[int, str] = {}  # replica queue k (not ours) -> our standby consumer tag
        self.active = True
        self.slowdown = EmulatedSlowdown(slowdown)

    @property
    def ref(self) -> PartRef:
        return PartRef(deployment=self.deployment, part=self.name, replica=self.replica, replicas=self.replicas)

    def mark_done(self, request_id: str) -> None:
        self.done[request_id] = None
        self.done.move_to_end(request_id)
        while len(self.done) > self.done_cache:
            self.done.popitem(last=False)


def parse_part_spec(spec: str) -> tuple[str, int, int]:
    """`part3` -> (part3, 0, 1); `part3@1/2` -> (part3, 1, 2)."""
    m = re.fullmatch(r"([^@\s]+)(?:@(\d+)/(\d+))?", spec.strip())
    if not m:
        raise ValueError(f"bad part spec {spec!r}: use NAME or NAME@REPLICA/REPLICAS")
    name, k, n = m.group(1), int(m.group(2) or 0), int(m.group(3) or 1)
    if not 0 <= k < n:
        raise ValueError(f"bad part spec {spec!r}: replica must be in 0..{n - 1}")
    return name, k, n
