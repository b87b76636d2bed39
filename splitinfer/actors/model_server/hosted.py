"""One part a model server hosts: its compiled function, replica, queues and consumers, joins, the requests it is
running and the ones it has served (a bounded memory, so a redelivered input is acked without recomputing), and how
its outputs leave: to the broker, to the caller as the job's answer, or handed to the next part in this process."""

from __future__ import annotations

import collections
import re

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from splitinfer.actors.model_server.joins import JoinBuffer
from splitinfer.actors.model_server.runner import EmulatedSlowdown
from splitinfer.messages import PartRef
from splitinfer.splitter.manifest import Manifest, PartEntry


class HostedPart:
    def __init__(self, deployment: str, entry: PartEntry, compiled, replica: int, replicas: int, *,
                 done_cache: int, join_buffer: int, slowdown: float, answers: bool = False):
        self.deployment = deployment
        self.entry = entry
        self.name = entry.name
        self.compiled = compiled
        self.replica = replica
        self.replicas = replicas
        self.inputs = {t.name: t for t in entry.inputs}
        self.outputs = list(entry.outputs)
        # this part produces every final output: it publishes the job's answer itself, straight to the caller
        self.answers = answers
        # the part hosted here that takes only this part's outputs, and is their only consumer: it runs right after
        # this one in this process, with no broker hop between them (see ModelServer.link_local)
        self.next: HostedPart | None = None
        self.joins = JoinBuffer(list(self.inputs), join_buffer)
        self.done: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.done_cache = done_cache
        # jobs this part has answered (it answers: `answers`): a second attempt of a job that completes here too
        # (its first one outlived a broker node it was thought lost with) is not answered again
        self.answered: collections.OrderedDict[str, None] = collections.OrderedDict()
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
        self._remember(self.done, request_id)

    def claim_answer(self, job_id: str) -> bool:
        """True the first time a job's answer leaves here (then `release_answer` if its publish fails)."""
        if job_id in self.answered:
            return False
        self._remember(self.answered, job_id)
        return True

    def release_answer(self, job_id: str) -> None:
        self.answered.pop(job_id, None)

    def _remember(self, memory: collections.OrderedDict, key: str) -> None:
        memory[key] = None
        memory.move_to_end(key)
        while len(memory) > self.done_cache:
            memory.popitem(last=False)


def answers_alone(manifest: Manifest, part: str) -> bool:
    """Whether this part produces every final output of the deployment (so its outputs are the whole answer)."""
    produced = {o.name for o in manifest.part(part).outputs}
    return set(manifest.output_names) <= produced


def takes_only_from(consumer: PartEntry, producer: PartEntry) -> bool:
    """Every input of `consumer` is an output of `producer`, and `consumer` is the only part that takes them, so
    the two can run back to back in one process with nothing else waiting for the tensors between them."""
    outputs = {o.name: o for o in producer.outputs}
    return bool(consumer.inputs) and all(
        t.name in outputs and not outputs[t.name].final and outputs[t.name].consumers == [consumer.name]
        for t in consumer.inputs)


def parse_part_spec(spec: str) -> tuple[str, int, int]:
    """`part3` -> (part3, 0, 1); `part3@1/2` -> (part3, 1, 2)."""
    m = re.fullmatch(r"([^@\s]+)(?:@(\d+)/(\d+))?", spec.strip())
    if not m:
        raise ValueError(f"bad part spec {spec!r}: use NAME or NAME@REPLICA/REPLICAS")
    name, k, n = m.group(1), int(m.group(2) or 0), int(m.group(3) or 1)
    if not 0 <= k < n:
        raise ValueError(f"bad part spec {spec!r}: replica must be in 0..{n - 1}")
    return name, k, n
