"""The base of every actor process: its lifecycle over the transport (connection, publisher, deliveries, RPC),
its presence (register, heartbeats, deregister), and one worker thread for blocking work.

Use: subclass `Actor`, override `setup()` (declare and `consume()` your queues), `heartbeat_state()` and
`hosted_parts()` if needed; run with `run_actor(actor)` (returns after SIGTERM/SIGINT or `request_stop()`).

Rules it implements (DESIGN.md):
- manual acks only, an explicit prefetch per consumer; every delivery handed to a handler is tracked until it is
  settled; a handler that raises gets the message dead-lettered with an error result, never crashes the actor;
- model work runs in `run_in_worker()` (one worker thread): the event loop never blocks on TensorFlow;
- SIGTERM: stop consuming, `on_stop()` (hand back buffered work), wait up to settings.drain_timeout_s for the
  deliveries in hand, requeue the rest, fail every pending RPC wait, deregister, close the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from splitinfer.actors.observability import HealthServer, Metrics
from splitinfer.actors.presence import Presence
from splitinfer.actors.transport import Deliveries, Logger, Names, NoBroker, Session, first_line, header_str
from splitinfer.actors.transport.retry import broker_lost
from splitinfer.actors.transport.topology import dead_letter_headers, key_problem
from splitinfer.config import Settings, get_settings
from splitinfer.messages import ErrorResult, Message, MessageError, PartRef, ServerState, decode, encode
from splitinfer.monitor.runtime import system_load

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


class Actor:
    kind = "actor"

    def __init__(self, actor_id: str, settings: Settings | None = None, *, site: str = "", capacity: float = 1.0):
        self.id = actor_id
        self.site = site
        self.capacity = capacity
        self.settings = settings or get_settings()
        self.names = Names(self.settings.namespace)
        self.log = Logger(actor_id, self.kind)
        self.session = Session(self.settings, f"{self.kind}:{actor_id}", self.log)
        self.connection, self.publisher, self.rpc = self.session.connection, self.session.publisher, self.session.rpc
        self.spawn = self.session.spawn
        self.deliveries = Deliveries(self.log, self.spawn)
        self.presence = Presence(self)
        self.metrics = Metrics(actor_id, self.kind, self.names.ns)
        self.metrics.broker_connected.set_function(lambda: 1.0 if self.connection.is_open else 0.0)
        self.metrics.heartbeat_age.set_function(self.presence.age)
        self.health: HealthServer | None = None
        self.started = False
        self.stats = {"processed": 0, "errors": 0}
        self._stop_event: asyncio.Event | None = None
        self._stopping = False
        self._stopped = False
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.kind}-worker")

    @property
    def channel(self):
        return self.connection.channel

    @property
    def exchanges(self):
        return self.connection.exchanges

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._stop_event = asyncio.Event()
        await self.connection.open()
        self.connection.on_reconnect(self._reconnected)
        if self.settings.metrics_port:
            self.health = HealthServer(self.metrics, self.not_ready, self.settings.metrics_host,
                                       self.settings.metrics_port)
            self.health.start()
            self.log("serving_metrics", url=self.health.url)
        await self.setup()
        await self.presence.start()
        self.started = True
        self.log("started", ns=self.names.ns, pid=os.getpid(), node=self.connection.node)

    def not_ready(self) -> str | None:
        """Why the actor cannot serve now (`/readyz`), or None. Called from the health server's threads."""
        if self.stopping:
            return "stopping"
        if not self.started:
            return "starting"
        if not self.connection.is_open:
            return "no broker connection"
        return None

    async def _reconnected(self) -> None:
        self.log("reconnected", node=self.connection.node, reconnects=self.connection.reconnects)

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
        self.log("stopping", inflight=len(self.deliveries))
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._consumers.clear()
        await self.on_stop()
        handed_back = await self.deliveries.drain(self.settings.drain_timeout_s)
        if self.connection.is_open:
            await self.presence.leave()
        await self.session.close()
        if self.health is not None:
            self.health.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._stopped = True
        self.log("stopped", handed_back=handed_back, **self.stats)

    async def on_stop(self) -> None:
        """Hook: after consumers are cancelled, before the drain (override to hand back buffered work)."""

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def run_in_worker(self, fn: Callable, *args: Any) -> Any:
        """Run blocking work (TensorFlow) in the actor's worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ consuming
    async def consume(self, queue: AbstractQueue, handler: Handler, *, arguments: dict | None = None,
                      exclusive: bool = False, prefetch: int | None = None) -> str:
        """Consume with manual ack. The handler settles the message through `self.deliveries` (or leaves it held);
        if it raises, the message gets an error result and is dead-lettered. `prefetch` gives this consumer its
        own unacked-delivery limit (default settings.prefetch)."""

        async def on_message(message: AbstractIncomingMessage) -> None:
            if self._stopping:
                await self.deliveries.requeue(message)
                return
            self.deliveries.track(message)
            try:
                await handler(message)
            except Exception as exc:  # a handler bug must not kill the actor or block the queue
                if broker_lost(exc) or not self.connection.is_open:
                    # not the message's fault: the broker hands it back (here or elsewhere) when the channel dies
                    self.log.warning("handler_interrupted", queue=queue.name, error=first_line(exc))
                    await self.deliveries.requeue(message)
                    return
                self.log.error("handler_failed", queue=queue.name, error=first_line(exc))
                await self.dead_letter(message, MessageError(first_line(exc), "internal",
                                                             header_str(message, "request_id")))

        async with self.connection.qos_lock:
            await self.connection.set_prefetch(prefetch or self.settings.prefetch)
            tag = await queue.consume(on_message, no_ack=False, arguments=arguments, exclusive=exclusive)
        self._consumers.append((queue, tag))
        return tag

    async def cancel(self, queue: AbstractQueue, tag: str) -> None:
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
        self._consumers = [(q, t) for q, t in self._consumers if t != tag]

    def decode(self, message: AbstractIncomingMessage, expect=None) -> Message:
        return decode(message.body, max_bytes=self.settings.max_message_bytes, expect=expect)

    async def dead_letter(self, message: AbstractIncomingMessage, err: MessageError, *, job_id: str | None = None,
                          deployment: str | None = None, answer: bool = True) -> None:
        """An error result for the message's job (to its reply_to; `answer=False`: none), then the message to
        `<ns>.dead` with the reason."""
        job_id = job_id or err.job_id or header_str(message, "request_id")
        self.stats["errors"] += 1
        if not answer:  # else publish_error counts it
            self.metrics.errors.labels(code=err.code).inc()
        self.log.warning("dead_letter", code=err.code, reason=err.reason, job_id=job_id, queue=message.routing_key)
        if answer:
            await self.publish_error(job_id, err.code, err.reason, reply_to=header_str(message, "reply_to"),
                                     deployment=deployment)
        await self.to_dead_letters(message, err.code, err.reason)

    async def to_dead_letters(self, message: AbstractIncomingMessage, code: str, reason: str) -> None:
        """Move a delivery to `<ns>.dead` with why (headers `x-splitinfer-*`: code, reason, actor, where it came
        from, so `splitinfer dead --requeue` can send it back), then ack it. If that copy cannot be published, the
        delivery is rejected instead: the queue's dead-letter exchange still takes it, without our reason."""
        headers = {**(message.headers or {}), **dead_letter_headers(message, code, reason, self.id)}
        try:
            await self.publisher.publish("dead", "", message.body, headers=headers, mandatory=False, persistent=True)
        except Exception as exc:
            self.log.error("dead_letter_publish_failed", error=first_line(exc))
            await self.deliveries.reject(message)
            return
        await self.deliveries.ack(message)

    async def publish_error(self, job_id: str | None, code: str, message: str, *, reply_to: str | None = None,
                            deployment: str | None = None, plan: str | None = None,
                            headers: dict | None = None) -> bytes | None:
        """An ErrorResult on `<ns>.results` (key reply_to / job id) and on control `error.<id>`. An error that
        belongs to no job (say, an undecodable control message) goes to control only: on the results exchange
        nobody could match it and the result store would keep an orphan row. A reply_to or job id that cannot be
        a routing key is skipped (its publish could never succeed). The answer's body once it is on the results
        exchange, else None."""
        self.metrics.errors.labels(code=code).inc()
        body = encode(ErrorResult(job_id=job_id, deployment=deployment, code=code, message=message[:1000],
                                  where=self.id, plan=plan))
        key = next((k for k in (reply_to, job_id) if k and key_problem(k, "key") is None), None)
        targets = [("control", self.names.error_key(self.id))]
        if key:
            targets.insert(0, ("results", self.names.result_key(key)))
        answered = None
        for exchange, rk in targets:
            try:
                await self.publisher.publish(exchange, rk, body, headers={"job_id": (job_id or "")[:1000],
                                                                          **(headers or {})}, mandatory=False)
                if exchange == "results":
                    answered = body
            except Exception as exc:
                self.log.error("error_publish_failed", error=first_line(exc))
        return answered

    # ------------------------------------------------------------------ what the heartbeats say
    def hosted_parts(self) -> list[PartRef]:
        return []

    async def heartbeat_state(self) -> ServerState:
        load = system_load()
        return ServerState(processed=self.stats["processed"], errors=self.stats["errors"],
                           load=float(len(self.deliveries)), cpu_percent=load["cpu_percent"],
                           memory_mb=load["memory_mb"], load_avg=load["load_avg"], not_ready=self.not_ready(),
                           metrics_url=self.health.url if self.health is not None else None)


def run_actor(actor: Actor) -> None:
    """Process entry point: run the actor until SIGTERM/SIGINT; exit code 0 on a clean stop, 2 if no broker
    answers, 1 if it could not start (e.g. a part that cannot load: one clear line, the supervisor restarts it)."""
    try:
        asyncio.run(actor.run())
    except NoBroker as exc:
        actor.log.error("no_broker", error=str(exc))
        raise SystemExit(2) from None
    except Exception as exc:
        actor.log.error("start_failed", error=first_line(exc))
        raise SystemExit(1) from None
