"""Ready requests and dynamic batches: requests whose inputs are all here wait in one queue; the worker takes the
oldest and the other ready requests of the same part, up to `max_batch`, waiting up to `max_delay_s` after the
oldest became ready for more of them to arrive (Triton's max queue delay; 0: take what is ready now), runs them as
one call (inputs concatenated on axis 0) and splits the outputs back per request. A request handed on from the part
before it in this process goes to the front, so a local chain runs back to back. Pure: numpy and asyncio, the
compiled part is a callable."""

from __future__ import annotations

import asyncio
import collections
import ctypes
import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
from aio_pika.abc import AbstractIncomingMessage

if TYPE_CHECKING:
    from splitinfer.actors.model_server.hosted import HostedPart


@dataclass(slots=True)
class WorkItem:
    """One request of one part, every input here."""

    part: "HostedPart"
    request_id: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]                      # the request's meta fields from its input frames (job, rt, err, ...)
    hops: list[list]                          # the hops so far, each in frames.HOP_FIELDS order
    messages: list[AbstractIncomingMessage]   # the deliveries to ack once everything they caused is confirmed
    received: float                           # wall clock when the last input arrived
    transfer_s: float = 0.0                   # sent -> received, the slowest input
    join_wait_s: float = 0.0                  # first input -> last input
    deadline: float | None = None             # loop time after which the job's answer is no longer wanted
    ready_at: float = 0.0                     # loop time when it became ready
    via: str = "broker"                       # how its inputs came: "broker", or "local" from the part before
    confirms: list[asyncio.Task] = field(default_factory=list)  # publishes of earlier stages in this process
    stages: list["HostedPart"] = field(default_factory=list)    # the parts before it in this process


ARRIVAL_TURNS = 2  # loop turns without a new arrival after which a batch stops gathering what is already here


class ReadyQueue:
    """FIFO of ready requests across every hosted part; `next_batch` waits for one."""

    def __init__(self):
        self._items: collections.deque[WorkItem] = collections.deque()
        self._event = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: WorkItem, first: bool = False) -> None:
        if first:
            self._items.appendleft(item)
        else:
            self._items.append(item)
        self._event.set()

    def _take(self, part, batch: list[WorkItem], max_batch: int) -> None:
        rest: collections.deque[WorkItem] = collections.deque()
        while self._items and len(batch) < max_batch:
            it = self._items.popleft()
            (batch if it.part is part else rest).append(it)
        rest.extend(self._items)
        self._items = rest

    async def _wait(self, timeout: float | None = None) -> None:
        self._event.clear()
        if timeout is None:
            await self._event.wait()
        else:
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def next_batch(self, max_batch: int, max_delay_s: float = 0.0) -> list[WorkItem]:
        """The oldest ready request and ready ones of the same part, at most max_batch; with max_delay_s, more that
        arrive within that long of the oldest being ready."""
        while not self._items:
            await self._wait()
        first = self._items.popleft()
        batch = [first]
        self._take(first.part, batch, max_batch)
        await self._gather_arrived(first.part, batch, max_batch)
        if max_delay_s > 0 and len(batch) < max_batch:
            loop = asyncio.get_running_loop()
            until = first.ready_at + max_delay_s
            while len(batch) < max_batch and loop.time() < until:
                await self._wait(until - loop.time())
                self._take(first.part, batch, max_batch)
        return batch

    async def _gather_arrived(self, part, batch: list[WorkItem], max_batch: int) -> None:
        """Let the loop turn a few times so deliveries already read off the socket while the last batch computed
        (the compute runs in the loop) join this batch; stops as soon as a turn brings none. Costs microseconds,
        so it holds with batching delay 0 too."""
        quiet = 0
        while len(batch) < max_batch and quiet < ARRIVAL_TURNS:
            before = len(batch)
            await asyncio.sleep(0)
            self._take(part, batch, max_batch)
            quiet = 0 if len(batch) > before else quiet + 1

    def drain(self) -> list[WorkItem]:
        items, self._items = list(self._items), collections.deque()
        return items


def run_batch(compiled: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
              requests: list[dict[str, np.ndarray]], max_bytes: int | None = None
              ) -> tuple[list[dict[str, np.ndarray]], float]:
    """Run requests as one batch (concatenated on axis 0) and split the outputs back; compute seconds. Requests
    that cannot be concatenated (0-d tensors, other trailing shapes, a fixed batch dimension) run one by one.
    `max_bytes` bounds the inputs of one call: requests are not joined past it, and a larger request runs in
    slices along axis 0 (a batch's activations grow with it; slices bound a server's peak memory)."""
    t0 = time.perf_counter()
    limit = max_bytes or 0
    if len(requests) == 1:
        return [run_bounded(compiled, requests[0], limit)], time.perf_counter() - t0
    first = requests[0]
    sizes = [next(iter(r.values())).shape[0] if next(iter(r.values())).ndim else 0 for r in requests]
    same_tail = all(all(r[n].ndim >= 1 and r[n].shape[1:] == first[n].shape[1:] for n in first) for r in requests)
    small = not limit or sum(v.nbytes for r in requests for v in r.values()) <= limit
    if same_tail and small and all(s > 0 for s in sizes):
        joined = {n: np.concatenate([r[n] for r in requests], axis=0) for n in first}
        out = compiled(joined)
        total = sum(sizes)
        if all(v.ndim >= 1 and v.shape[0] == total for v in out.values()):
            bounds = np.cumsum(sizes)[:-1]
            split = {n: np.split(v, bounds, axis=0) for n, v in out.items()}
            return [{n: split[n][i] for n in out} for i in range(len(requests))], time.perf_counter() - t0
    outs = [run_bounded(compiled, r, limit) for r in requests]
    return outs, time.perf_counter() - t0


def run_bounded(compiled: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
                request: dict[str, np.ndarray], max_bytes: int) -> dict[str, np.ndarray]:
    """One request, in slices of at most `max_bytes` of inputs along axis 0 when it is larger (0: no bound); then
    the freed memory goes back to the system. A part whose outputs do not keep the batch axis runs whole."""
    size = sum(v.nbytes for v in request.values())
    rows = {v.shape[0] if v.ndim else 0 for v in request.values()}
    if not max_bytes or size <= max_bytes or len(rows) != 1 or (n := rows.pop()) <= 1:
        return compiled(request)
    step = max(1, int(n * max_bytes // size))
    pieces = []
    for start in range(0, n, step):
        out = compiled({k: v[start:start + step] for k, v in request.items()})
        if not all(v.ndim >= 1 and v.shape[0] == min(step, n - start) for v in out.values()):
            return compiled(request)
        pieces.append(out)
    joined = {k: np.concatenate([p[k] for p in pieces], axis=0) for k in pieces[0]}
    del pieces
    release_memory()
    return joined


def release_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them otherwise: a server that ran one large job
    would stay at its peak). A no-op where there is no malloc_trim."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
