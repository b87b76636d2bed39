"""The base actor: one robust aio-pika connection, confirmed publishes, tracked deliveries, heartbeats, graceful stop.

Use: subclass `Actor`, override `setup()` (declare and `consume()` your queues), `heartbeat_state()` and
`registration()` if needed; run with `asyncio.run(actor.run())` (returns after SIGTERM/SIGINT or `request_stop()`).

Rules it implements (DESIGN.md):
- publisher confirms on (`publish()` returns once the broker confirmed; `publish_soon()` returns a task so the
  caller goes on while the confirm is pending; `ack_when_confirmed()` acks inputs when their outputs' confirms
  arrive, nacks them back (requeue) if a publish finally failed);
- explicit prefetch (settings.prefetch, per consumer); manual acks only;
- every delivery handed to a handler is tracked until acked/nacked/rejected; a handler that raises gets the
  message dead-lettered with an error result, never crashes the actor;
- model work runs in `run_in_worker()` (one worker thread): the event loop never blocks on TF;
- heartbeats on `<ns>.control` (`heartbeat.<id>`) every settings.heartbeat_interval_s, `register.<id>` at start,
  `deregister.<id>` at stop;
- SIGTERM: stop consuming, wait up to settings.drain_timeout_s for in-flight work, nack(requeue=True) the rest,
  fail every pending future (RPC waits) with ActorStopped, close the connection;
- structured logs: one JSON object per line on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Iterable

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from splitinfer.actors.topology import Names, declare_core
from splitinfer.messages import (
    ErrorResult,
    Heartbeat,
    Deregister,
    Message,
    MessageError,
    PartRef,
    Register,
    ServerState,
    decode,
    encode,
)
from splitinfer.monitor.links import LinkEmulator
from splitinfer.settings import Settings, get_settings

# Bounded retries (publish of an output / an error): attempts and first backoff, doubling.
PUBLISH_ATTEMPTS = 4
PUBLISH_BACKOFF_S = 0.1
CONNECT_ATTEMPTS = 20
CONNECT_BACKOFF_S = 0.5


class ActorStopped(RuntimeError):
    """The actor is stopping: pending waits fail with this instead of hanging."""


class Logger:
    """One JSON object per line on stderr: time, actor, kind, event, fields."""

    def __init__(self, actor_id: str, kind: str, stream=None):
        self.actor_id = actor_id
        self.kind = kind
        self.stream = stream or sys.stderr

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        rec = {"t": round(time.time(), 4), "level": level, "actor": self.actor_id, "kind": self.kind, "event": event}
        rec.update(fields)
        try:
            self.stream.write(json.dumps(rec, default=str) + "\n")
            self.stream.flush()
        except Exception:
            pass

    def error(self, event: str, **fields: Any) -> None:
        self(event, level="error", **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self(event, level="warning", **fields)


def header_str(message: AbstractIncomingMessage, key: str) -> str | None:
    v = (message.headers or {}).get(key)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return v if isinstance(v, str) and v else None


class Actor:
    kind = "actor"

    def __init__(self, actor_id: str, settings: Settings | None = None, *, site: str = "", capacity: float = 1.0):
        self.id = actor_id
        self.site = site
        self.capacity = capacity
        self.settings = settings or get_settings()
        self.names = Names(self.settings.namespace)
        self.log = Logger(actor_id, self.kind)
        # emulated links between sites (off unless settings.emulate_links); actors that receive tensors delay them
        # with it and follow SetLinks orders (actors/monitors.py: follow_links)
        self.links = LinkEmulator.from_settings(self.settings)
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self.stats = {"processed": 0, "errors": 0}
        self._stop_event: asyncio.Event | None = None
        self._stopping = False
        self._stopped = False
        self._tasks: set[asyncio.Task] = set()
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._inflight: dict[int, AbstractIncomingMessage] = {}
        self._rpc_pending: dict[str, asyncio.Future] = {}
        self._reply_queue: AbstractQueue | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.kind}-worker")
        self._qos = 0
        self._qos_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._stop_event = asyncio.Event()
        last: Exception | None = None
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                self.connection = await aio_pika.connect_robust(
                    self.settings.broker_url, client_properties={"connection_name": f"{self.kind}:{self.id}@{self.names.ns}"})
                break
            except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
                last = exc
                await asyncio.sleep(min(CONNECT_BACKOFF_S * (2 ** attempt), 5.0))
        else:
            raise ConnectionError(f"no broker at {self.settings.broker_url}: {last}")
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await self.channel.set_qos(prefetch_count=self.settings.prefetch)
        self._qos = self.settings.prefetch
        self.exchanges = await declare_core(self.channel, self.names, expires_s=self.settings.queue_expires_s)
        await self.setup()
        await self.publish("control", self.names.register_key(self.id), self.registration(), mandatory=False)
        self.spawn(self._heartbeat_loop(), name="heartbeat")
        self.log("started", ns=self.names.ns, pid=os.getpid())

    async def setup(self) -> None:
        """Declare and consume the actor's queues (override)."""

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT or request_stop(), then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            assert self._stop_event is not None
            await self._stop_event.wait()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopping = True
        self.log("stopping", inflight=len(self._inflight))
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._consumers.clear()
        await self.on_stop()
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        handed_back = 0
        for message in list(self._inflight.values()):
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
                handed_back += 1
        self._inflight.clear()
        for fut in self._rpc_pending.values():
            if not fut.done():
                fut.set_exception(ActorStopped(f"{self.id} is stopping"))
        self._rpc_pending.clear()
        with contextlib.suppress(Exception):
            if self.channel is not None and not self.channel.is_closed:
                await asyncio.wait_for(
                    self.publish("control", self.names.deregister_key(self.id),
                                 Deregister(actor_id=self.id, reason="stop"), mandatory=False), 2.0)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._stopped = True
        self.log("stopped", handed_back=handed_back, **self.stats)

    async def on_stop(self) -> None:
        """Hook: after consumers are cancelled, before the drain (override to hand back buffered work)."""

    @property
    def stopping(self) -> bool:
        return self._stopping

    def spawn(self, coro: Awaitable, name: str = "") -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.error("task_failed", error=f"{type(exc).__name__}: {exc}")

    async def run_in_worker(self, fn: Callable, *args: Any) -> Any:
        """Run blocking work (TF) in the actor's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ consuming
    async def consume(self, queue: AbstractQueue, handler: Callable[[AbstractIncomingMessage], Awaitable[None]],
                      *, arguments: dict | None = None, exclusive: bool = False, prefetch: int | None = None) -> str:
        """Consume with manual ack. The handler must settle the message (ack/nack/dead_letter) or leave it tracked;
        if it raises, the message gets an error result and is dead-lettered. `prefetch` gives this consumer its
        own unacked-delivery limit (default settings.prefetch)."""

        async def _on_message(message: AbstractIncomingMessage) -> None:
            if self._stopping:
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
                return
            self._inflight[id(message)] = message
            try:
                await handler(message)
            except Exception as exc:  # a handler bug must not kill the actor or block the queue
                self.log.error("handler_failed", queue=queue.name, error=f"{type(exc).__name__}: {exc}")
                await self.dead_letter(message, MessageError(f"{type(exc).__name__}: {exc}", "internal",
                                                             header_str(message, "request_id")))

        async with self._qos_lock:  # basic.qos (per consumer) applies to the consumers started after it
            limit = prefetch or self.settings.prefetch
            if limit != self._qos:
                await self.channel.set_qos(prefetch_count=limit)
                self._qos = limit
            tag = await queue.consume(_on_message, no_ack=False, arguments=arguments, exclusive=exclusive)
        self._consumers.append((queue, tag))
        return tag

    async def cancel(self, queue: AbstractQueue, tag: str) -> None:
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
        self._consumers = [(q, t) for q, t in self._consumers if t != tag]

    def track(self, message: AbstractIncomingMessage) -> None:
        self._inflight[id(message)] = message

    async def ack(self, message: AbstractIncomingMessage) -> None:
        self._inflight.pop(id(message), None)
        with contextlib.suppress(Exception):  # a tag from a closed channel: the broker already requeued it
            await message.ack()

    async def nack(self, message: AbstractIncomingMessage, requeue: bool = True) -> None:
        self._inflight.pop(id(message), None)
        with contextlib.suppress(Exception):
            await message.nack(requeue=requeue)

    async def dead_letter(self, message: AbstractIncomingMessage, err: MessageError | str, code: str = "bad_message",
                          job_id: str | None = None, deployment: str | None = None) -> None:
        """Publish an error result (to reply_to / job id) and reject the message to `<ns>.dead`."""
        if isinstance(err, MessageError):
            code, reason, job_id = err.code, err.reason, job_id or err.job_id
        else:
            reason = str(err)
        job_id = job_id or header_str(message, "request_id")
        self.stats["errors"] += 1
        self.log.warning("dead_letter", code=code, reason=reason, job_id=job_id, queue=message.routing_key)
        await self.publish_error(job_id, code, reason, reply_to=header_str(message, "reply_to"),
                                 deployment=deployment)
        self._inflight.pop(id(message), None)
        with contextlib.suppress(Exception):
            await message.reject(requeue=False)

    def decode(self, message: AbstractIncomingMessage, expect=None) -> Message:
        return decode(message.body, max_bytes=self.settings.max_message_bytes, expect=expect)

    # ------------------------------------------------------------------ publishing
    async def publish(self, exchange: str, routing_key: str, msg: Message | bytes, *, headers: dict | None = None,
                      reply_to: str | None = None, correlation_id: str | None = None, mandatory: bool = True,
                      attempts: int = PUBLISH_ATTEMPTS) -> None:
        """Publish and wait for the broker's confirm; retry (bounded, with backoff) on nack, unroutable or a lost
        channel. `exchange` is a key of self.exchanges ("tensors", "results", "control", "dead"), "" for the
        default exchange, or a full exchange name."""
        body = msg if isinstance(msg, (bytes, bytearray)) else encode(msg)
        amqp_msg = aio_pika.Message(body=bytes(body), headers=headers or {}, reply_to=reply_to,
                                    correlation_id=correlation_id,
                                    delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)
        delay = PUBLISH_BACKOFF_S
        for attempt in range(attempts):
            try:
                assert self.channel is not None
                ex = await self._exchange(exchange)
                await ex.publish(amqp_msg, routing_key=routing_key, mandatory=mandatory)
                return
            except (aio_pika.exceptions.PublishError, aio_pika.exceptions.DeliveryError,
                    aio_pika.exceptions.ChannelInvalidStateError, aio_pika.exceptions.AMQPError,
                    ConnectionError, asyncio.TimeoutError) as exc:
                if attempt + 1 >= attempts or self._stopped:
                    raise
                self.log.warning("publish_retry", exchange=exchange, key=routing_key, attempt=attempt + 1,
                                 error=f"{type(exc).__name__}: {str(exc)[:200]}")
                await asyncio.sleep(delay)
                delay *= 2

    async def _exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        assert self.channel is not None
        if name == "":
            return self.channel.default_exchange
        if name in self.exchanges:
            return self.exchanges[name]
        ex = await self.channel.get_exchange(name, ensure=False)
        self.exchanges[name] = ex
        return ex

    def publish_soon(self, exchange: str, routing_key: str, msg: Message | bytes, **kw: Any) -> asyncio.Task:
        """Start a confirmed publish and return its task: the caller goes on while the confirm is pending."""
        return self.spawn(self.publish(exchange, routing_key, msg, **kw), name="publish")

    def ack_when_confirmed(self, messages: Iterable[AbstractIncomingMessage], confirms: Iterable[asyncio.Task],
                           on_done: Callable[[bool], None] | None = None) -> asyncio.Task:
        """Ack the inputs once every publish they caused is confirmed; if one finally failed, hand the inputs back
        (nack requeue) so another try (or replica) redoes the work. Off the critical path: returns a task."""
        messages, confirms = list(messages), list(confirms)

        async def _settle() -> None:
            results = await asyncio.gather(*confirms, return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            ok = not failed
            for m in messages:
                if ok:
                    await self.ack(m)
                else:
                    await self.nack(m, requeue=True)
            if failed:
                self.log.error("publish_failed", error=f"{type(failed[0]).__name__}: {failed[0]}",
                               inputs=len(messages))
            if on_done is not None:
                on_done(ok)

        return self.spawn(_settle(), name="settle")

    async def publish_error(self, job_id: str | None, code: str, message: str, *, reply_to: str | None = None,
                            deployment: str | None = None, plan: str | None = None) -> None:
        """An ErrorResult on `<ns>.results` (key reply_to / job id) and on control `error.<id>`. An error that
        belongs to no job (say, an undecodable control message) goes to control only: on the results exchange
        nobody could match it and the result store would keep an orphan row."""
        err = ErrorResult(job_id=job_id, deployment=deployment, code=code, message=message[:1000], where=self.id,
                          plan=plan)
        body = encode(err)
        key = reply_to or job_id
        targets = [("control", self.names.error_key(self.id))]
        if key:
            targets.insert(0, ("results", self.names.result_key(key)))
        for exchange, rk in targets:
            try:
                await self.publish(exchange, rk, body, headers={"job_id": job_id or ""}, mandatory=False)
            except Exception as exc:
                self.log.error("error_publish_failed", error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ RPC over the broker
    async def rpc(self, routing_key: str, msg: Message, *, exchange: str = "control",
                  timeout: float | None = None) -> Message:
        """Request/response: publish with reply_to = this actor's exclusive reply queue; wait for the answer
        (decoded and validated). Fails with ActorStopped when the actor stops, TimeoutError after timeout."""
        if self._stopping:
            raise ActorStopped(f"{self.id} is stopping")
        if self._reply_queue is None:
            assert self.channel is not None
            self._reply_queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
            await self._reply_queue.consume(self._on_reply, no_ack=True)
        corr = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self._rpc_pending[corr] = fut
        try:
            await self.publish(exchange, routing_key, msg, reply_to=self._reply_queue.name, correlation_id=corr)
            return await asyncio.wait_for(fut, timeout or self.settings.rpc_timeout_s)
        finally:
            self._rpc_pending.pop(corr, None)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._rpc_pending.get(message.correlation_id or "")
        if fut is None or fut.done():
            return
        try:
            fut.set_result(self.decode(message))
        except MessageError as exc:
            fut.set_exception(exc)

    async def reply(self, request: AbstractIncomingMessage, msg: Message) -> None:
        """Answer an RPC request (no-op when it has no reply_to)."""
        if not request.reply_to:
            return
        await self.publish("", request.reply_to, msg, correlation_id=request.correlation_id, mandatory=False)

    # ------------------------------------------------------------------ heartbeats
    def hosted_parts(self) -> list[PartRef]:
        return []

    async def heartbeat_state(self) -> ServerState:
        state = ServerState(processed=self.stats["processed"], errors=self.stats["errors"],
                            load=float(len(self._inflight)))
        try:
            import psutil

            proc = psutil.Process()
            state.cpu_percent = proc.cpu_percent(None)
            state.memory_mb = proc.memory_info().rss / 1e6
        except Exception:
            pass
        return state

    def registration(self) -> Register:
        return Register(actor_id=self.id, kind=self.kind, site=self.site, capacity=self.capacity,
                        parts=self.hosted_parts(), host=socket.gethostname(), pid=os.getpid())

    async def heartbeat(self) -> None:
        hb = Heartbeat(actor_id=self.id, kind=self.kind, site=self.site, capacity=self.capacity,
                       parts=self.hosted_parts(), state=await self.heartbeat_state(),
                       interval_s=self.settings.heartbeat_interval_s)
        await self.publish("control", self.names.heartbeat_key(self.id), hb, mandatory=False, attempts=1)

    async def _heartbeat_loop(self) -> None:
        while not self._stopping:
            try:
                await self.heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("heartbeat_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.settings.heartbeat_interval_s)


def run_actor(actor: Actor) -> None:
    """Process entry point: run the actor until SIGTERM/SIGINT; exit code 0 on a clean stop."""
    try:
        asyncio.run(actor.run())
    except ConnectionError as exc:
        actor.log.error("no_broker", error=str(exc))
        raise SystemExit(2) from None
    except Exception as exc:  # e.g. a part that cannot load at start: one clear line, exit 1 (supervisor restarts)
        first = str(exc).splitlines()[0] if str(exc) else ""
        actor.log.error("start_failed", error=f"{type(exc).__name__}: {first}")
        raise SystemExit(1) from None
