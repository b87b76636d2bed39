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
  already on the next batch); a request id already served is acked without recomputing (bounded memory).

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
from splitinfer.actors.model_pool.client import PoolClient
from splitinfer.actors.model_server.batching import ReadyQueue, WorkItem, run_batch
from splitinfer.actors.model_server.hosted import HostedPart, parse_part_spec
from splitinfer.actors.model_server.joins import Pending
from splitinfer.actors.model_server.runner import configure_tf, load_and_warm
from splitinfer.actors.monitors import NetworkMonitor, ServerMonitor, follow_links
from splitinfer.actors.transport import first_line, header_str
from splitinfer.actors.transport.topology import declare_control_queue, declare_part
from splitinfer.config import Settings, get_settings
from splitinfer.messages import (
    Hop,
    LoadPart,
    MessageError,
    PartRef,
    PowerSpec,
    Register,
    Reply,
    ServerState,
    TensorMessage,
    UnloadPart,
    check_tensor,
    compress_array,
    decompress_array,
    encode,
)
from splitinfer.monitor.links import LinkEmulator
from splitinfer.monitor.runtime import cached_speed_gflops
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

    # ------------------------------------------------------------------ setup
    async def setup(self) -> None:
        configure_tf(self.settings)
        q = await declare_control_queue(
            self.channel, self.names, f"{self.names.ns}.server.{self.id}",
            [self.names.load_key(self.id), self.names.unload_key(self.id), "register.*"],
            expires_s=self.settings.queue_expires_s)
        await self.consume(q, self._on_control)
        await follow_links(self)  # SetLinks orders and network probes
        if self.monitor.speed_gflops is None:
            self.monitor.speed_gflops = await self.run_in_worker(cached_speed_gflops, self.settings.cache_dir)
        self.network.start()
        self.spawn(self._worker(), name="worker")
        if self.initial_parts:
            await asyncio.gather(*(self.load_part(self.deployment, name, k, n) for name, k, n in self.initial_parts))

    def hosted_parts(self) -> list[PartRef]:
        return [p.ref for p in self.parts.values()]

    async def heartbeat_state(self) -> ServerState:
        state = await super().heartbeat_state()
        depths: dict[str, int] = {}
        for p in self.parts.values():
            if p.queues:
                with contextlib.suppress(Exception):  # a queue deleted meanwhile (undeploy)
                    async with self.connection.scratch_channel() as ch:
                        q = await ch.declare_queue(p.queues[p.replica].name, passive=True)
                        depths[q.name] = int(q.declaration_result.message_count or 0)
        state = state.model_copy(update={"load": float(len(self.ready) + self._busy), "queue_depths": depths})
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
        compiled = await self.run_in_worker(load_and_warm, directory, entry, self.settings.max_batch)
        hp = HostedPart(deployment, entry, compiled, replica, replicas, done_cache=self.settings.done_cache,
                        join_buffer=self.settings.join_buffer, slowdown=self.slowdown)
        hp.queues = await declare_part(self.channel, self.names, deployment, part, [t.name for t in entry.inputs],
                                       replicas, expires_s=self.settings.queue_expires_s)
        self.parts[(deployment, part)] = hp
        tag = await self.consume(hp.queues[replica], self._handler(hp, replica), prefetch=self._prefetch(hp))
        hp.tags.append((hp.queues[replica], tag))
        if replicas > 1:
            self.spawn(self._standby(hp, [k for k in range(replicas) if k != replica]), name="standby")
        self.log("part_loaded", deployment=deployment, part=part, replica=replica, replicas=replicas,
                 load_s=round(time.time() - t0, 3))
        await self.presence.announce()
        return hp

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
            for m in pend.messages.values():
                await self.deliveries.requeue(m)
        self.log("queue_given_back", part=hp.name, queue=hp.queues[k].name, partial_joins=len(handed))
        await self._standby(hp, [k])

    async def unload_part(self, deployment: str, part: str) -> bool:
        hp = self.parts.pop((deployment, part), None)
        if hp is None:
            return False
        hp.active = False
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
            ok = await self.unload_part(msg.deployment, msg.part)
            await self.rpc.reply(message, Reply(ok=ok, message="unloaded" if ok else "not hosted"))
            return

        async def load() -> None:
            try:
                await self.load_part(msg.deployment, msg.part, msg.replica, msg.replicas)
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
            await self._on_tensor(hp, message, queue)

        return handle

    def _validate(self, hp: HostedPart, message: AbstractIncomingMessage) -> tuple[TensorMessage, int]:
        """The delivery as this part's input (decompressed to the manifest dtype) and its bytes on the wire."""
        msg = self.decode(message, expect=TensorMessage)
        if msg.deployment != hp.deployment:
            raise MessageError(f"tensor for deployment {msg.deployment!r} on a queue of {hp.deployment!r}",
                               "wrong_deployment", msg.request_id)
        spec = hp.inputs.get(msg.tensor)
        if spec is None:
            raise MessageError(f"{msg.tensor!r} is not an input of {hp.name}", "wrong_tensor", msg.request_id)
        wire_bytes = msg.array.nbytes
        if msg.codec is not None:  # sent compressed at a cut (the plan chose it): back to the manifest's dtype
            try:
                array = decompress_array(msg.array, msg.codec, msg.scale, spec.dtype)
            except MessageError as err:
                raise MessageError(f"{msg.tensor}: {err.reason}", err.code, msg.request_id) from None
            msg = msg.model_copy(update={"array": array, "codec": None, "scale": None})
        check_tensor(msg.array, spec.shape, spec.dtype, msg.tensor, msg.request_id)
        if header_str(message, "request_id") != msg.request_id:
            raise MessageError("AMQP header request_id does not match the message's request_id",
                               "bad_header", msg.request_id)
        return msg, wire_bytes

    async def _on_tensor(self, hp: HostedPart, message: AbstractIncomingMessage, queue: int = 0) -> None:
        now = time.time()
        try:
            msg, wire_bytes = self._validate(hp, message)
        except MessageError as err:
            await self.dead_letter(message, err, deployment=hp.deployment)
            return
        # link emulation: a tensor from another site arrives RTT + bytes/bandwidth later (0 when off)
        delay = self.links.delay(msg.site, self.site, wire_bytes, now)
        if delay > 0:
            await asyncio.sleep(delay)
            now = time.time()
        self.monitor.add_radio(self.links.wire_s(msg.site, self.site, wire_bytes))
        rid = msg.request_id
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
        if msg.deadline is not None and now > msg.deadline:
            self.log.warning("expired", part=hp.name, request_id=rid)
            await self.deliveries.ack(message)
            return
        if len(hp.inputs) == 1:
            self._enqueue(WorkItem(hp, rid, {msg.tensor: msg}, [message], {msg.tensor: now}, now))
            return
        for oldest in hp.joins.evict_for_new(rid):
            await self._fail_pending(hp, oldest, "join_buffer_full",
                                     f"{hp.name}: join buffer full ({self.settings.join_buffer} requests)")
        pend, new, old = hp.joins.add(msg, message, now, queue)
        if old is not None:  # the same input twice (redelivery after a channel loss): keep the newest
            await self.deliveries.ack(old)
        if hp.joins.complete(pend):
            self._enqueue(WorkItem(hp, rid, pend.tensors, list(pend.messages.values()), pend.received, now))
        elif new:
            pend.timer = asyncio.get_running_loop().call_later(
                self.settings.join_timeout_s, lambda: self.spawn(self._join_timeout(hp, rid)))

    async def _join_timeout(self, hp: HostedPart, rid: str) -> None:
        pend = hp.joins.pop(rid)
        if pend is not None:
            await self._fail_pending(hp, pend, "join_timeout", f"{hp.name}: inputs {hp.joins.missing(pend)} did not "
                                                               f"arrive within {self.settings.join_timeout_s}s")

    async def _fail_pending(self, hp: HostedPart, pend: Pending, code: str, reason: str) -> None:
        """One error result for the request, and every input it had to the dead-letter queue."""
        pend.cancel_timer()
        messages = list(pend.messages.values())
        if messages:
            await self.dead_letter(messages[0], MessageError(reason, code, pend.request_id), deployment=hp.deployment)
        for m in messages[1:]:
            await self.deliveries.reject(m)

    def _enqueue(self, item: WorkItem) -> None:
        item.part.running.setdefault(item.request_id, [])
        self.ready.put(item)

    async def _worker(self) -> None:
        while True:
            try:
                await self._work()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one bad batch stop the server's only worker
                self.log.error("worker_error", error=first_line(exc))

    async def _work(self) -> None:
        while True:
            batch = await self.ready.next_batch(self.settings.max_batch)
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
                outs, compute_s = await self.run_in_worker(run_batch, hp.compiled, [it.tensors for it in batch])
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
                    self._publish_outputs(it, out, started, compute_s, len(batch))
                except MessageError as err:
                    await self._fail_item(it, err.code, f"{hp.name}: {err.reason}")
                except Exception as exc:  # e.g. an output dtype the wire does not allow: fail this request only
                    await self._fail_item(it, "bad_output", f"{hp.name}: {first_line(exc)}")

    async def _fail_item(self, it: WorkItem, code: str, reason: str) -> None:
        pend = Pending(it.request_id, it.tensors, {str(i): m for i, m in enumerate(it.messages)})
        await self._fail_pending(it.part, pend, code, reason)
        await self._settle_extras(it, "reject")

    async def _settle_extras(self, it: WorkItem, how: str) -> None:
        """Settle the duplicate deliveries that arrived while the request was queued or running, the way the
        original went: "ack", "requeue" or "reject"."""
        settle = {"ack": self.deliveries.ack, "requeue": self.deliveries.requeue, "reject": self.deliveries.reject}[how]
        for m in it.part.running.pop(it.request_id, []):
            await settle(m)

    def _publish_outputs(self, it: WorkItem, out: dict[str, np.ndarray], started: float, compute_s: float,
                         batch: int) -> None:
        hp = it.part
        first_in, last_in = min(it.received.values()), max(it.received.values())
        hops: list[Hop] = []
        seen: set[tuple[str, str]] = set()
        for t in it.tensors.values():
            for h in t.hops:
                if (h.part, h.server) not in seen:
                    seen.add((h.part, h.server))
                    hops.append(h)
        hops.append(Hop(part=hp.name, server=self.id,
                        transfer_s=max(0.0, max(it.received[n] - t.sent_at for n, t in it.tensors.items())),
                        join_wait_s=last_in - first_in, queue_wait_s=max(0.0, started - last_in),
                        compute_s=compute_s, batch=batch, finished_at=time.time()))
        any_in = next(iter(it.tensors.values()))
        deadlines = [t.deadline for t in it.tensors.values() if t.deadline is not None]
        headers = {"request_id": it.request_id}
        if any_in.reply_to:
            headers["reply_to"] = any_in.reply_to
        bodies = []
        for spec in hp.outputs:
            array, scale = out[spec.name], None
            if spec.codec is not None:  # the plan sends this cut compressed: fewer bytes on the link
                array, scale = compress_array(array, spec.codec)
            body = encode(TensorMessage(
                request_id=it.request_id, deployment=hp.deployment, tensor=spec.name, array=array,
                produced_by=hp.name, server=self.id, deadline=min(deadlines) if deadlines else None,
                reply_to=any_in.reply_to, hops=hops, site=self.site, codec=spec.codec, scale=scale))
            if len(body) > self.settings.max_message_bytes:
                raise MessageError(f"output {spec.name} is {len(body)} bytes, over the limit of "
                                   f"{self.settings.max_message_bytes}", "output_too_large", it.request_id)
            bodies.append((spec, body))
            if self.monitor.is_device and self.links.enabled:  # radio time: the receiver is unknown here, so the
                slowest = self.links.slowest_from(self.site)     # narrowest link from this site stands for it
                if slowest is not None:
                    self.monitor.add_radio(slowest.wire_s(array.nbytes))
        # A final output may have no listener (front end down): don't bounce it; an inner one must route.
        confirms = [self.publisher.soon("tensors", self.names.tensor_key(hp.deployment, spec.name), body,
                                        headers=headers, mandatory=not spec.final or bool(spec.consumers))
                    for spec, body in bodies]

        def done(ok: bool) -> None:
            if ok:
                hp.mark_done(it.request_id)
                self.stats["processed"] += 1
            self.spawn(self._settle_extras(it, "ack" if ok else "requeue"), name="settle_extras")

        self.deliveries.ack_when_confirmed(it.messages, confirms, on_done=done)

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
            for m in pend.messages.values():
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
