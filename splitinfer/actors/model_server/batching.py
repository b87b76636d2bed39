"""Ready requests and batches: requests whose inputs are all here wait in one queue; the worker takes the oldest
and every other ready request of the same part, up to a bounded batch, runs them as one call (inputs concatenated
on axis 0) and splits the outputs back per request. Pure: numpy and asyncio, the compiled part is a callable."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
from aio_pika.abc import AbstractIncomingMessage

from splitinfer.messages import TensorMessage

if TYPE_CHECKING:
    from splitinfer.actors.model_server.hosted import HostedPart


@dataclass
class WorkItem:
    part: "HostedPart"
    request_id: str
    tensors: dict[str, TensorMessage]
    messages: list[AbstractIncomingMessage]
    received: dict[str, float]
    ready_at: float


class ReadyQueue:
    """FIFO of ready requests across every hosted part; `next_batch` waits for one."""

    def __init__(self):
        self._items: collections.deque[WorkItem] = collections.deque()
        self._event = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: WorkItem) -> None:
        self._items.append(item)
        self._event.set()

    async def next_batch(self, max_batch: int) -> list[WorkItem]:
        """The oldest ready request and the next ready ones of the same part, at most max_batch in all."""
        while not self._items:
            self._event.clear()
            await self._event.wait()
        first = self._items.popleft()
        batch = [first]
        if max_batch > 1:
            rest: collections.deque[WorkItem] = collections.deque()
            while self._items and len(batch) < max_batch:
                it = self._items.popleft()
                (batch if it.part is first.part else rest).append(it)
            rest.extend(self._items)
            self._items = rest
        return batch

    def drain(self) -> list[WorkItem]:
        items, self._items = list(self._items), collections.deque()
        return items


def run_batch(compiled: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
              requests: list[dict[str, TensorMessage]]) -> tuple[list[dict[str, np.ndarray]], float]:
    """Run requests as one batch (concatenated on axis 0) and split the outputs back; compute seconds. Requests
    that cannot be concatenated (0-d tensors, other trailing shapes, a fixed batch dimension) run one by one."""
    t0 = time.perf_counter()
    if len(requests) == 1:
        out = compiled({n: t.array for n, t in requests[0].items()})
        return [out], time.perf_counter() - t0
    first = requests[0]
    sizes = [next(iter(r.values())).array.shape[0] if next(iter(r.values())).array.ndim else 0 for r in requests]
    same_tail = all(all(r[n].array.ndim >= 1 and r[n].array.shape[1:] == first[n].array.shape[1:] for n in first)
                    for r in requests)
    if same_tail and all(s > 0 for s in sizes):
        joined = {n: np.concatenate([r[n].array for r in requests], axis=0) for n in first}
        out = compiled(joined)
        total = sum(sizes)
        if all(v.ndim >= 1 and v.shape[0] == total for v in out.values()):
            bounds = np.cumsum(sizes)[:-1]
            split = {n: np.split(v, bounds, axis=0) for n, v in out.items()}
            return [{n: split[n][i] for n in out} for i in range(len(requests))], time.perf_counter() - t0
    outs = [compiled({n: t.array for n, t in r.items()}) for r in requests]
    return outs, time.perf_counter() - t0
