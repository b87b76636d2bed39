"""The model server actor: serves parts of deployments, each as one compiled tf.function, over `<ns>.tensors`.

Per hosted part (deployment D, part P, replica k of n):
- declares P's consistent-hash exchange (bound to `<ns>.tensors` with P's input keys) and the n replica queues
  (topology.declare_part); consumes its own queue r<k> at once and, after settings.standby_delay_s, the other
  replicas' queues as a standby (x-single-active-consumer: a standby gets a queue only when its active consumer
  is gone, e.g. kill -9; RabbitMQ requeues the dead one's unacked inputs to it, so a join's inputs still meet in
  one process); when a replica's owner (re)registers, a standby that took over its queue gives it back (cancels
  that consumer, hands its partial joins back with a requeue) and stands by again;
- validates every delivery: decodes (size, depth, dtype, shape x itemsize), checks the tensor is one of P's inputs
  with the manifest's dtype and shape, and that the AMQP header request_id matches; a bad one gets an ErrorResult
  on `<ns>.results` and is rejected into `<ns>.dead`;
- a join gathers a request's inputs in a bounded buffer (joins.JoinBuffer) with a timeout that yields an error;
- complete requests wait in one ready queue; one worker thread runs them, batched per part up to
  settings.max_batch (batching); each output is published once to `<ns>.tensors` with key `<D>.<tensor>` and
  header request_id, carrying the hops so far plus this one;
- inputs are acked only when all the outputs they caused are confirmed (off the critical path: the worker is
  already on the next batch); a request id already served is acked without recomputing (bounded memory);
- what it was ordered to host from the pool is kept in a file (desired.DesiredParts): restarted, it loads those
  parts again by itself (retrying while the pool is not up yet).

    python -m splitinfer.actors.model_server --id s1 --site edge [--slowdown X] [--battery] [--power C,R,I]
        [--memory-limit-mb M] [--deployment D] [--split-dir DIR] [--part SPEC ...]

SPEC is `part3` (replica 0 of 1) or `part3@1/2` (replica 1 of 2); repeat --part or join with ','. With --split-dir
the parts load from that local split (the deployment id defaults to its split_id); without it they are fetched from
the model pool over the broker (needs --deployment). With no --part the server starts empty and waits for LoadPart
orders on `load.<id>` (what `splitinfer deploy` sends).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np
from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.actor import Actor, run_actor
from splitinfer.actors.model_pool.client import PoolClient, PoolError
from splitinfer.actors.model_server.batching import ReadyQueue, WorkItem, run_batch
from splitinfer.actors.model_server.desired import DesiredParts
from splitinfer.actors.model_server.hosted import HostedPart, answers_alone, parse_part_spec, takes_only_from
from splitinfer.actors.model_server.joins import Arrival, Pending
from splitinfer.actors.model_server.runner import configure_tf, load_and_warm
from splitinfer.splitter.runtimes import available_runtimes
from splitinfer.actors.monitors import NetworkMonitor, ServerMonitor, follow_links
from splitinfer.actors.transport import first_line, header_str
from splitinfer.actors.transport.retry import RESTORE
from splitinfer.actors.transport.topology import declare_control_queue, declare_part, escape_key
from splitinfer.config import Settings, get_settings
from splitinfer.messages import (
    LoadPart,
    MessageError,
    PartRef,
    PowerSpec,
    Register,
    Reply,
    ServerState,
    UnloadPart,
    check_tensor,
    compress_array,
    decompress_array,
)
from splitinfer.messages.frames import CARRIED, RESULT, TENSORS, Frame, decode_frame, encode_frame, unique_hops
from splitinfer.monitor.links import LinkEmulator
from splitinfer.monitor.runtime import speed_gflops
from splitinfer.splitter.manifest import Manifest


class ModelServer(Actor):
    kind = "model_server"

    def __init__(self, actor_id: str, settings: Settings | None = None, *, site: str = "", capacity: float = 1.0,
                 split_dir: Path | None = None, deployment: str | None = None,
                 parts: list[tuple[str, int, int]] | None = None, slowdown: float | None = None,
                 battery: bool | None = None, power: PowerSpec | None = None):
        super().__init__(actor_id, settings, site=site, capacity=capacity)
        # emulated slower device: each compute is followed by idling in the worker loop (runner.EmulatedSlowdown)
        self.slowdown = max(1.0, slowdown if slowdown is not None else self.settings.slowdown)
        # emulated links between sites (off unless settings.emulate_links): delays what this server receives
        self.links = LinkEmulator.from_settings(self.settings)
        self.monitor = ServerMonitor(self, self.slowdown, battery, power=power)
        self.network = NetworkMonitor(self)
        self.pool = PoolClient(self.rpc, self.settings.pool_chunk_bytes)
        self.split_dir = Path(split_dir) if split_dir else None
        self.deployment = deployment
        self.initial_parts = parts or []
        self.parts: dict[tuple[str, str], HostedPart] = {}
        self.ready = ReadyQueue()
        self._loading: dict[tuple[str, str], asyncio.Task] = {}
        self._busy = 0
        self._max_batch_bytes = int(self.settings.max_batch_mb * 1024 * 1024)
        self.desired = DesiredParts(self.settings.cache_dir / "hosting" / self.names.ns / f"{escape_key(actor_id)}.json")

    # ------------------------------------------------------------------ setup
    async def setup(self) -> None:
        configure_tf(self.settings)
        q = await declare_control_queue(
            self.channel, self.names, f"{self.names.ns}.server.{self.id}",
            [self.names.load_key(self.id), self.names.unload_key(self.id), "register.*"], self.connection.policy)
        await self.consume(q, self._on_control)
        await follow_links(self)  # SetLinks orders and network probes
        if self.monitor.speed_gflops is None:  # measured once per machine (cached), so the planner knows this one
            self.monitor.speed_gflops = await self.run_in_worker(speed_gflops, self.settings.profile_cache(),
                                                                 self.settings.calibrate_at_start)
        self.network.start()
        self.spawn(self._worker(), name="worker")
        if self.initial_parts:
            await asyncio.gather(*(self.load_part(self.deployment, name, k, n) for name, k, n in self.initial_parts))
        elif self.split_dir is None and (kept := self.desired.load()):
            self.spawn(self._restore(kept), name="restore")

    async def _restore(self, refs: list[PartRef]) -> None:
        """Load again what this server hosted before it restarted. The pool may start after us: a load that
        cannot reach it is tried again (RESTORE backoff); one the pool refuses (the deployment is gone) is dropped."""
        async def one(ref: PartRef) -> str | None:
            for failures in range(1, RESTORE.attempts + 1):
                try:
                    await self.load_part(ref.deployment, ref.part, ref.replica, ref.replicas)
                    return None
                except PoolError as exc:
                    self.desired.remove(ref.deployment, ref.part)
                    return f"{ref.part} of {ref.deployment}: {first_line(exc)}"
                except Exception as exc:
                    if self.stopping or failures == RESTORE.attempts:
                        return f"{ref.part} of {ref.deployment}: {first_line(exc)}"
                    await asyncio.sleep(RESTORE.delay(failures))
            return None

        failed = [f for f in await asyncio.gather(*(one(r) for r in refs)) if f]
        self.log("parts_restored", parts=[f"{r.deployment}/{r.part}@r{r.replica}/{r.replicas}" for r in refs],
                 failed=failed)

    def hosted_parts(self) -> list[PartRef]:
        return [p.ref for p in self.parts.values()]

    def not_ready(self) -> str | None:
        """Not ready while a part it is ordered to host (now, or before a restart) is not loaded yet."""
        why = super().not_ready()
        if why is not None:
            return why
        loaded = {key for key, hp in self.parts.items() if hp.active}
        waiting = ({(r.deployment, r.part) for r in self.desired.load()} | set(self._loading)) - loaded
        return f"loading {', '.join(f'{p} of {d}' for d, p in sorted(waiting))}" if waiting else None

    async def heartbeat_state(self) -> ServerState:
        state = await super().heartbeat_state()
        for (deployment, part), hp in self.parts.items():
            self.metrics.join_buffer.labels(deployment=deployment, part=part).set(len(hp.joins))
        depths: dict[str, int] = {}
        for p in self.parts.values():
            if p.queues:
                with contextlib.suppress(Exception):  # a queue deleted meanwhile (undeploy)
                    async with self.connection.scratch_channel() as ch:
                        q = await ch.declare_queue(p.queues[p.replica].name, passive=True)
                        depths[q.name] = int(q.declaration_result.message_count or 0)
                        self.metrics.queue_depth.labels(queue=q.name).set(depths[q.name])
        state = state.model_copy(update={"load": float(len(self.ready) + self._busy), "queue_depths": depths,
                                         "runtimes": available_runtimes()})
        return self.monitor.fill(state)

    # ------------------------------------------------------------------ loading parts
    async def load_part(self, deployment: str | None, part: str, replica: int = 0, replicas: int = 1) -> HostedPart:
        """Load (from the local split or the model pool), warm up, declare and consume. Idempotent per part."""
        if self.split_dir is not None and deployment is None:
            deployment = self.deployment = Manifest.load(self.split_dir).split_id
        if not deployment:
            raise ValueError("a deployment id is needed to load parts from the model pool")
        key = (deployment, part)
        if key in self.parts:
            return self.parts[key]
        if key in self._loading:
            return await self._loading[key]
        task = asyncio.ensure_future(self._load(deployment, part, replica, replicas))
        self._loading[key] = task
        try:
            return await task
        finally:
            self._loading.pop(key, None)

    async def _load(self, deployment: str, part: str, replica: int, replicas: int) -> HostedPart:
        t0 = time.time()
        if self.split_dir is not None:
            directory = self.split_dir
            manifest = Manifest.load(directory)
        else:
            directory = self.settings.cache_dir / "parts" / self.names.ns / deployment
            manifest = await self.pool.fetch_deployment(deployment, directory, parts=[part])
        entry = manifest.part(part)
        compiled = await self.run_in_worker(load_and_warm, directory, entry, self.settings.max_batch,
                                             self.settings.intra_op_threads)
        hp = HostedPart(deployment, entry, compiled, replica, replicas, done_cache=self.settings.done_cache,
                        join_buffer=self.settings.join_buffer, slowdown=self.slowdown,
                        answers=answers_alone(manifest, part))
        hp.queues = await declare_part(self.channel, self.names, deployment, part, [t.name for t in entry.inputs],
                                       replicas, self.connection.policy)
        self.parts[(deployment, part)] = hp
        self.link_local(deployment)
        tag = await self.consume(hp.queues[replica], self._handler(hp, replica), prefetch=self._prefetch(hp))
        hp.tags.append((hp.queues[replica], tag))
        if replicas > 1:
            self.spawn(self._standby(hp, [k for k in range(replicas) if k != replica]), name="standby")
        self.log("part_loaded", deployment=deployment, part=part, replica=replica, replicas=replicas,
                 load_s=round(time.time() - t0, 3))
        await self.presence.announce()
        return hp

    def link_local(self, deployment: str) -> None:
        """Consecutive parts hosted here run back to back in this process: a part whose inputs all come from one
        part hosted here, and only it takes them, gets them handed over with no broker hop (settings.local_handoff).
        Called whenever what this server hosts of the deployment changes."""
        hosted = [hp for (dep, _), hp in self.parts.items() if dep == deployment and hp.active]
        for hp in hosted:
            hp.next = next((c for c in hosted if c is not hp and takes_only_from(c.entry, hp.entry)), None) \
                if self.settings.local_handoff else None

    def _prefetch(self, hp: HostedPart) -> int:
        """A join's consumer may hold up to join_buffer partial requests (n-1 of n inputs each) and must still get
        the inputs that complete them: a prefetch below that would stall until the join timeout."""
        return self.settings.prefetch + self.settings.join_buffer * (len(hp.inputs) - 1)

    async def _standby(self, hp: HostedPart, replicas: list[int]) -> None:
        """Wait on the other replicas' queues as a single-active-consumer standby (after a delay, so that at a
        common start each replica becomes the active consumer of its own queue)."""
        await asyncio.sleep(self.settings.standby_delay_s)
        if self.stopping or not hp.active:
            return
        for k in replicas:
            if k not in hp.standby_tags:
                q = hp.queues[k]
                tag = await self.consume(q, self._handler(hp, k), prefetch=self._prefetch(hp))
                hp.standby_tags[k] = tag
                hp.tags.append((q, tag))
        self.log("standby", part=hp.name, queues=[hp.queues[k].name for k in replicas])

    async def _give_back_queue(self, hp: HostedPart, k: int) -> None:
        """Replica k's owner (re)registered: stop standing in for it on its queue, so the broker makes the owner
        the active consumer again; partial joins taken from that queue go back to it; then stand by again."""
        tag = hp.standby_tags.pop(k, None)
        if tag is None:
            return
        await self.cancel(hp.queues[k], tag)
        hp.tags = [(q, t) for q, t in hp.tags if t != tag]
        handed = hp.joins.from_queue(k)
        for pend in handed:
            for m in pend.messages:
                await self.deliveries.requeue(m)
        self.log("queue_given_back", part=hp.name, queue=hp.queues[k].name, partial_joins=len(handed))
        await self._standby(hp, [k])

    async def unload_part(self, deployment: str, part: str) -> bool:
        hp = self.parts.pop((deployment, part), None)
        if hp is None:
            return False
        hp.active = False
        self.link_local(deployment)
        for q, tag in hp.tags:
            await self.cancel(q, tag)
        await self._hand_back(hp)
        self.log("part_unloaded", deployment=deployment, part=part)
        await self.presence.announce()  # the registry learns at once, not at the next heartbeat
        return True

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        try:
            msg = self.decode(message, expect=(LoadPart, UnloadPart, Register))
        except MessageError as err:
            await self.dead_letter(message, err)
            return
        await self.deliveries.ack(message)
        if isinstance(msg, Register):
            if msg.actor_id != self.id:
                for ref in msg.parts:
                    hp = self.parts.get((ref.deployment, ref.part))
                    if hp is not None and ref.replica != hp.replica and ref.replica in hp.standby_tags:
                        self.spawn(self._give_back_queue(hp, ref.replica), name="give_back")
            return
        if isinstance(msg, UnloadPart):
            self.desired.remove(msg.deployment, msg.part)
            ok = await self.unload_part(msg.deployment, msg.part)
            await self.rpc.reply(message, Reply(ok=ok, message="unloaded" if ok else "not hosted"))
            return

        async def load() -> None:
            try:
                await self.load_part(msg.deployment, msg.part, msg.replica, msg.replicas)
                self.desired.add(PartRef(deployment=msg.deployment, part=msg.part, replica=msg.replica,
                                         replicas=msg.replicas))
                await self.rpc.reply(message, Reply(ok=True, message=f"{msg.part} loaded on {self.id}"))
            except Exception as exc:
                reason = first_line(exc)
                self.log.error("load_failed", deployment=msg.deployment, part=msg.part, error=reason)
                await self.publish_error(None, "load_failed", f"{msg.part}: {reason}", deployment=msg.deployment)
                await self.rpc.reply(message, Reply(ok=False, message=reason))

        self.spawn(load(), name="load")

    # ------------------------------------------------------------------ data plane
    def _handler(self, hp: HostedPart, queue: int):
        async def handle(message: AbstractIncomingMessage) -> None:
            await self._on_frame(hp, message, queue)

        return handle

    def _validate(self, hp: HostedPart, message: AbstractIncomingMessage) -> tuple[Frame, int]:
        """The delivery as inputs of this part (decompressed to the manifest's dtypes) and its bytes on the wire."""
        frame = decode_frame(message.body, self.settings.max_message_bytes)
        rid = frame.request_id
        if frame.kind != TENSORS:
            raise MessageError("a result frame on a part's queue", "bad_frame", rid)
        if frame.deployment != hp.deployment:
            raise MessageError(f"tensor for deployment {frame.deployment!r} on a queue of {hp.deployment!r}",
                               "wrong_deployment", rid)
        if header_str(message, "request_id") != rid:
            raise MessageError("AMQP header request_id does not match the frame's request id", "bad_header", rid)
        wire_bytes = 0
        for name, array in list(frame.arrays.items()):
            spec = hp.inputs.get(name)
            if spec is None:
                raise MessageError(f"{name!r} is not an input of {hp.name}", "wrong_tensor", rid)
            wire_bytes += array.nbytes
            codec = frame.codecs.get(name)
            if codec is not None:  # sent compressed at a cut (the plan chose it): back to the manifest's dtype
                try:
                    array = frame.arrays[name] = decompress_array(array, codec[0], codec[1], spec.dtype)
                except MessageError as err:
                    raise MessageError(f"{name}: {err.reason}", err.code, rid) from None
            check_tensor(array, spec.shape, spec.dtype, name, rid)
        if not frame.arrays:
            raise MessageError("a frame with no tensors on a part's queue", "bad_frame", rid)
        return frame, wire_bytes

    async def _on_frame(self, hp: HostedPart, message: AbstractIncomingMessage, queue: int = 0) -> None:
        received = time.time()
        try:
            frame, wire_bytes = self._validate(hp, message)
        except MessageError as err:
            await self.dead_letter(message, err, deployment=hp.deployment)
            return
        meta = frame.meta
        # link emulation: a tensor from another site arrives RTT + bytes/bandwidth later (0 when off)
        delay = self.links.delay(meta.get("site", ""), self.site, wire_bytes, received)
        if delay > 0:
            await asyncio.sleep(delay)
            received = time.time()
        self.monitor.add_radio(self.links.wire_s(meta.get("site", ""), self.site, wire_bytes))
        loop = asyncio.get_running_loop()
        now = loop.time()
        rid = frame.request_id
        if message.redelivered:
            self.stats["redelivered"] = self.stats.get("redelivered", 0) + 1
        if rid in hp.done:
            self.log("duplicate", part=hp.name, request_id=rid, redelivered=message.redelivered)
            await self.deliveries.ack(message)
            return
        if rid in hp.running:
            self.log("duplicate_in_progress", part=hp.name, request_id=rid)
            hp.running[rid].append(message)
            return
        budget = meta.get("budget")
        deadline = None if budget is None else now + budget
        if deadline is not None and now >= deadline:
            self.log.warning("expired", part=hp.name, request_id=rid)
            await self.deliveries.ack(message)
            return
        # the sender's clock against ours: only meaningful where clocks agree (NTP); never more than the time the
        # job had left when it was sent (a sender whose clock is behind would otherwise report hours)
        transfer = max(0.0, received - meta["sent"]) if "sent" in meta else 0.0
        if budget is not None:
            transfer = min(transfer, budget)
        if len(frame.arrays) == len(hp.inputs):  # everything this part takes came in one frame
            self._enqueue(WorkItem(hp, rid, dict(frame.arrays), meta, list(frame.hops), [message], received,
                                   transfer_s=transfer, deadline=deadline, ready_at=now))
            return
        for oldest in hp.joins.evict_for_new(rid):
            await self._fail_pending(hp, oldest, "join_buffer_full",
                                     f"{hp.name}: join buffer full ({self.settings.join_buffer} requests)")
        pend, new, replaced = hp.joins.add(rid, Arrival(frame.arrays, message, meta, received, transfer, deadline),
                                           queue)
        for old in replaced:  # the same input twice (redelivery after a channel loss): keep the newest
            await self.deliveries.ack(old)
        if hp.joins.complete(pend):
            self._enqueue(self._joined(hp, pend, now))
        elif new:
            pend.timer = loop.call_later(self.settings.join_timeout_s, lambda: self.spawn(self._join_timeout(hp, rid)))

    @staticmethod
    def _joined(hp: HostedPart, pend: Pending, now: float) -> WorkItem:
        """A complete join as one work item: every input, the hops behind each (once), the earliest deadline."""
        arrivals = list(pend.arrivals.values())
        hops = unique_hops(a.meta.get("hops") or [] for a in arrivals)
        deadlines = [a.deadline for a in arrivals if a.deadline is not None]
        first, last = min(a.received for a in arrivals), max(a.received for a in arrivals)
        return WorkItem(hp, pend.request_id, {n: a.arrays[n] for n, a in pend.arrivals.items()}, arrivals[0].meta,
                        hops, pend.messages, last, transfer_s=max(a.transfer_s for a in arrivals),
                        join_wait_s=last - first, deadline=min(deadlines) if deadlines else None, ready_at=now)

    async def _join_timeout(self, hp: HostedPart, rid: str) -> None:
        pend = hp.joins.pop(rid)
        if pend is not None:
            await self._fail_pending(hp, pend, "join_timeout", f"{hp.name}: inputs {hp.joins.missing(pend)} did not "
                                                               f"arrive within {self.settings.join_timeout_s}s")

    async def _fail_pending(self, hp: HostedPart, pend: Pending, code: str, reason: str) -> None:
        pend.cancel_timer()
        first = next(iter(pend.arrivals.values()), None)
        await self._fail(hp, pend.request_id, first.meta if first else {}, pend.messages, code, reason)

    async def _fail(self, hp: HostedPart, rid: str, meta: dict, messages: list[AbstractIncomingMessage], code: str,
                    reason: str) -> None:
        """One error result for the request (to the front end when the request names one, which decides the job's
        answer, else to its caller), and every delivery it brought to the dead-letter queue. It names the request
        (one attempt), not the job: an error of an attempt the front end gave up on must not answer the job."""
        self.stats["errors"] += 1
        self.log.warning("request_failed", part=hp.name, request_id=rid, code=code, reason=reason)
        await self.publish_error(rid, code, reason, reply_to=meta.get("err") or meta.get("rt"),
                                 deployment=hp.deployment)
        for m in messages:
            await self.to_dead_letters(m, code, reason)

    def _enqueue(self, item: WorkItem, first: bool = False) -> None:
        item.part.running.setdefault(item.request_id, [])
        self.ready.put(item, first)

    async def _worker(self) -> None:
        while True:
            try:
                await self._work()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one bad batch stop the server's only worker
                self.log.error("worker_error", error=first_line(exc))

    async def _work(self) -> None:
        delay_s = self.settings.batch_delay_us / 1e6
        while True:
            batch = await self.ready.next_batch(self.settings.max_batch, delay_s)
            for it in [it for it in batch if not it.part.active]:  # unloaded meanwhile: hand back
                await self._settle_extras(it, "requeue")
                for m in it.messages:
                    await self.deliveries.requeue(m)
            batch = [it for it in batch if it.part.active]
            if not batch:
                continue
            hp = batch[0].part
            self._busy = len(batch)
            started = time.time()
            try:
                # in the event loop itself: a hand-off to a thread and back costs more than it saves (the loop has
                # nothing to do meanwhile that cannot wait: what it published before is flushed first)
                outs, compute_s = run_batch(hp.compiled, [it.arrays for it in batch], self._max_batch_bytes)
                self.metrics.part_compute.labels(deployment=hp.deployment, part=hp.name).observe(compute_s)
                self.metrics.part_batch.labels(deployment=hp.deployment, part=hp.name).observe(len(batch))
                extra = hp.slowdown.extra_s(len(batch), compute_s)
                if extra > 0:  # a slower device: the worker (this server's only compute) stays busy
                    await asyncio.sleep(extra)
                    compute_s += extra
                self.monitor.add_compute(compute_s)
            except Exception as exc:
                reason = f"{hp.name} failed: {first_line(exc)}"
                for it in batch:
                    await self._fail_item(it, "compute_failed", reason)
                continue
            finally:
                self._busy = 0
            for it, out in zip(batch, outs):
                try:
                    self._forward(it, out, started, compute_s, len(batch))
                except MessageError as err:
                    await self._fail_item(it, err.code, f"{hp.name}: {err.reason}")
                except Exception as exc:  # e.g. an output dtype the wire does not allow: fail this request only
                    await self._fail_item(it, "bad_output", f"{hp.name}: {first_line(exc)}")
            await self.connection.flush()

    async def _fail_item(self, it: WorkItem, code: str, reason: str) -> None:
        await self._fail(it.part, it.request_id, it.meta, it.messages, code, reason)
        await self._settle_extras(it, "reject")

    async def _settle_extras(self, it: WorkItem, how: str) -> None:
        """Settle the duplicate deliveries that arrived while the request was queued or running, the way the
        original went: "ack", "requeue" or "reject"."""
        settle = {"ack": self.deliveries.ack, "requeue": self.deliveries.requeue, "reject": self.deliveries.reject}[how]
        for m in it.part.running.pop(it.request_id, []):
            await settle(m)

    def _forward(self, it: WorkItem, out: dict[str, np.ndarray], started: float, compute_s: float,
                 batch: int) -> None:
        """Where a request's outputs go: tensors other parts take to `<ns>.tensors` (one frame each), the job's
        answer straight to its caller on `<ns>.results` when this part produces all of it, and the tensors of the
        part that runs next in this process handed over without a broker hop. The inputs are acked once every
        publish this request caused here is confirmed. Past the job's deadline nothing goes on: the front end
        answers it `deadline_exceeded` (after a grace), and a late answer would contradict that."""
        hp = it.part
        now_wall, now = time.time(), asyncio.get_running_loop().time()
        confirms = list(it.confirms)
        if it.deadline is not None and now >= it.deadline:
            self.log.warning("expired", part=hp.name, request_id=it.request_id, after="compute")
            self._ack_when_confirmed(it, confirms, count=False)
            return
        self.metrics.part_requests.labels(deployment=hp.deployment, part=hp.name).inc()
        self.metrics.part_latency.labels(deployment=hp.deployment, part=hp.name).observe(
            max(0.0, now_wall - it.received))
        hops = [*it.hops, [hp.name, self.id, it.transfer_s, it.join_wait_s, max(0.0, started - it.received),
                           compute_s, batch, now_wall, it.via]]
        meta = {k: v for k, v in it.meta.items() if k in CARRIED}
        meta.update(rid=it.request_id, dep=hp.deployment, src=hp.name, srv=self.id, site=self.site, sent=now_wall,
                    hops=hops)
        if it.deadline is not None:
            meta["budget"] = it.deadline - now
        headers = {"request_id": it.request_id}
        if it.meta.get("err") or it.meta.get("rt"):  # where errors about an undecodable frame go
            headers["reply_to"] = it.meta.get("err") or it.meta.get("rt")
        nxt = hp.next if hp.next is not None and hp.next.active else None
        finals: dict[str, np.ndarray] = {}
        final_codecs: dict[str, tuple[str, float | None]] = {}
        for spec in hp.outputs:
            if nxt is not None and spec.name in nxt.inputs:
                continue  # handed over below
            array, codec = out[spec.name], {}
            if spec.codec is not None:  # the plan sends this tensor compressed: fewer bytes on the link
                array, scale = compress_array(array, spec.codec)
                codec = {spec.name: (spec.codec, scale)}
            if spec.final and hp.answers:
                finals[spec.name] = array
                final_codecs.update(codec)
                if not spec.consumers:
                    continue
            body = self._frame(TENSORS, meta, {spec.name: array}, codec, it.request_id)
            # a final output the front end assembles may have no listener (front end down): don't bounce it
            confirms.append(self.publisher.soon("tensors", self.names.tensor_key(hp.deployment, spec.name), body,
                                                headers=headers, mandatory=not spec.final or bool(spec.consumers)))
            self._account_radio(array.nbytes)
        claimed = None
        if hp.answers and not hp.claim_answer(it.meta.get("job") or it.request_id):
            self.log.info("duplicate_answer_dropped", part=hp.name, request_id=it.request_id,
                          job=it.meta.get("job") or it.request_id)
        elif hp.answers:
            answer = {**meta, "job": it.meta.get("job") or it.request_id}
            claimed = answer["job"]
            body = self._frame(RESULT, answer, finals, final_codecs, it.request_id)
            key = self.names.result_key(it.meta.get("rt") or answer["job"])
            nbytes = sum(a.nbytes for a in finals.values())
            # link emulation: the answer crosses to the caller's site; the caller is no actor of the emulated
            # cluster, so this part, the sender, makes it wait as the link would
            delay = self.links.delay(self.site, it.meta.get("origin", self.site), nbytes, now_wall)
            confirms.append(self.publisher.soon("results", key, body, headers=headers, mandatory=False)
                            if delay <= 0 else self.spawn(self._publish_later(delay, "results", key, body, headers)))
            self._account_radio(nbytes)
        if nxt is None:
            self._ack_when_confirmed(it, confirms, answer_of=claimed)
            return
        self.spawn(self._settle_extras(it, "ack"), name="settle_extras")
        self._enqueue(WorkItem(nxt, it.request_id, {n: out[n] for n in nxt.inputs}, it.meta, hops, it.messages,
                               now_wall, deadline=it.deadline, ready_at=now, via="local", confirms=confirms,
                               stages=[*it.stages, hp]),
                      first=True)

    async def _publish_later(self, delay: float, exchange: str, key: str, body: bytes, headers: dict) -> None:
        await asyncio.sleep(delay)
        await self.publisher.publish(exchange, key, body, headers=headers, mandatory=False)

    def _ack_when_confirmed(self, it: WorkItem, confirms: list[asyncio.Task], count: bool = True,
                            answer_of: str | None = None) -> None:
        """Ack the request's deliveries once its publishes are confirmed; only then is it done at every part it
        went through here (a redelivery is acked without recomputing). If a publish finally failed, the deliveries
        go back to the queue and the request is computed again (and the job's answer, `answer_of`, may leave
        again)."""
        def done(ok: bool) -> None:
            if ok:
                for stage in (*it.stages, it.part):
                    stage.mark_done(it.request_id)
                if count:
                    self.stats["processed"] += 1
            elif answer_of is not None:
                it.part.release_answer(answer_of)
            self.spawn(self._settle_extras(it, "ack" if ok else "requeue"), name="settle_extras")

        self.deliveries.ack_when_confirmed(it.messages, confirms, on_done=done)

    def _frame(self, kind: int, meta: dict, arrays: dict[str, np.ndarray], codecs: dict, rid: str) -> bytes:
        body = encode_frame(kind, meta, arrays, codecs)
        if len(body) > self.settings.max_message_bytes:
            raise MessageError(f"outputs of {len(body)} bytes, over the limit of {self.settings.max_message_bytes}",
                               "output_too_large", rid)
        return body

    def _account_radio(self, nbytes: int) -> None:
        if self.monitor.is_device and self.links.enabled:  # radio time: the receiver is unknown here, so the
            slowest = self.links.slowest_from(self.site)     # narrowest link from this site stands for it
            if slowest is not None:
                self.monitor.add_radio(slowest.wire_s(nbytes))

    # ------------------------------------------------------------------ stop
    async def on_stop(self) -> None:
        """Consumers are cancelled: hand back what can't finish here (partial joins, queued work)."""
        partial = 0
        for hp in list(self.parts.values()):
            partial += await self._hand_back(hp)
        queued = self.ready.drain()
        for it in queued:
            await self._settle_extras(it, "requeue")
            for m in it.messages:
                await self.deliveries.requeue(m)
        self.log("handed_back", queued_requests=len(queued), partial_joins=partial, running=self._busy)

    async def _hand_back(self, hp: HostedPart) -> int:
        pending = hp.joins.clear()
        for pend in pending:
            for m in pend.messages:
                await self.deliveries.requeue(m)
        return len(pending)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m splitinfer.actors.model_server", description=__doc__.splitlines()[0])
    ap.add_argument("--id", "--server-id", dest="id", required=True)
    ap.add_argument("--site", default="")
    ap.add_argument("--capacity", type=float, default=1.0)
    ap.add_argument("--deployment", default=None)
    ap.add_argument("--split-dir", type=Path, default=None)
    ap.add_argument("--part", action="append", default=[], help="NAME or NAME@REPLICA/REPLICAS; repeat or use ','")
    ap.add_argument("--slowdown", type=float, default=None, help="emulate a slower device (default settings.slowdown)")
    ap.add_argument("--battery", action=argparse.BooleanOptionalAction, default=None,
                    help="report a battery level (default: only at site 'device')")
    ap.add_argument("--power", default=None, help="COMPUTE_W,RADIO_W,IDLE_W of the simulated battery")
    ap.add_argument("--memory-limit-mb", type=float, default=None, help="weights this server may hold (planner)")
    args = ap.parse_args(argv)
    power = None
    if args.power:
        try:
            cw, rw, iw = (float(x) for x in args.power.split(","))
        except ValueError:
            ap.error("--power takes COMPUTE_W,RADIO_W,IDLE_W")
        power = PowerSpec(compute_w=cw, radio_w=rw, idle_w=iw)
    parts = [parse_part_spec(s) for spec in args.part for s in spec.split(",") if s.strip()]
    if parts and args.split_dir is None and not args.deployment:
        ap.error("--part without --split-dir needs --deployment (the parts come from the model pool)")
    settings = None
    if args.memory_limit_mb is not None:
        settings = get_settings().model_copy(update={"memory_limit_mb": args.memory_limit_mb})
    run_actor(ModelServer(args.id, settings, site=args.site, capacity=args.capacity, split_dir=args.split_dir,
                          deployment=args.deployment, parts=parts, slowdown=args.slowdown, battery=args.battery,
                          power=power))
