"""What an actor shows to Prometheus and to whoever runs it: `/metrics` (prometheus_client, one registry per
process), `/healthz` (the event loop still turns) and `/readyz` (the actor says it can serve: connected to the
broker, and for a model server every part it was ordered to host loaded). A small threaded HTTP server, off the
event loop, on settings.metrics_port (0: none); the supervisor gives each process of a cluster its own port.

One `Metrics` for every kind of actor: a model server fills the per-part series, a front end the job series;
series an actor never touches stay empty.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LOOP_STALL_S = 10.0  # /healthz fails when the event loop has not turned for this long (a blocked or hung actor)


class Metrics:
    def __init__(self, actor_id: str, kind: str, namespace: str):
        r = self.registry = CollectorRegistry()
        Info("splitinfer_actor", "The actor this process runs", registry=r).info(
            {"actor": actor_id, "kind": kind, "namespace": namespace})
        self.errors = Counter("splitinfer_errors", "Errors answered or dead-lettered, by code", ["code"], registry=r)
        self.heartbeat_age = Gauge("splitinfer_heartbeat_age_seconds", "Since the last heartbeat went out",
                                   registry=r)
        self.broker_connected = Gauge("splitinfer_broker_connected", "1 while the broker connection is open",
                                      registry=r)
        # model servers, per part
        part = ["deployment", "part"]
        self.part_requests = Counter("splitinfer_part_requests", "Requests a part computed", part, registry=r)
        self.part_compute = Histogram("splitinfer_part_compute_seconds", "Compute time of a part's batch", part,
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.part_latency = Histogram("splitinfer_part_latency_seconds",
                                      "From a request's last input arriving to its outputs going out", part,
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.part_batch = Histogram("splitinfer_part_batch_size", "Requests per computed batch", part,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("splitinfer_queue_depth", "Messages waiting in a queue this actor consumes",
                                 ["queue"], registry=r)
        self.join_buffer = Gauge("splitinfer_part_join_buffer", "Requests waiting for the rest of their inputs",
                                 part, registry=r)
        # front ends
        self.jobs = Counter("splitinfer_jobs", "Jobs admitted", registry=r)
        self.answers = Counter("splitinfer_answers", "Jobs answered, by code (ok for a result)", ["code"],
                               registry=r)
        self.deadline_misses = Counter("splitinfer_deadline_misses", "Jobs answered deadline_exceeded", registry=r)
        self.retries = Counter("splitinfer_retries", "Job attempts sent again", registry=r)
        self.plan_jobs = Counter("splitinfer_plan_jobs", "Jobs answered, by the plan they ran on",
                                 ["deployment", "plan"], registry=r)
        self.job_latency = Histogram("splitinfer_job_latency_seconds", "Submission to answer", buckets=LATENCY_BUCKETS,
                                     registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """/metrics, /healthz and /readyz on a port of its own, served by threads (never the event loop)."""

    def __init__(self, metrics: Metrics, ready: Callable[[], str | None], host: str, port: int):
        self.metrics = metrics
        self.ready = ready                       # None when ready, else why not (shown in the 503's body)
        self.loop_seen = time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, server.metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    stalled = time.monotonic() - server.loop_seen
                    ok = stalled < LOOP_STALL_S
                    self._send(200 if ok else 503, b"ok\n" if ok else f"event loop stalled {stalled:.0f}s\n".encode())
                elif path == "/readyz":
                    why = server.ready()
                    self._send(200 if why is None else 503, b"ready\n" if why is None else f"{why}\n".encode())
                else:
                    self._send(404, b"not found: /metrics, /healthz, /readyz\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args) -> None:  # scrapes are not log lines
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
        self.url = f"http://{shown}:{self.port}/metrics"  # what `splitinfer status` shows
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health-http", daemon=True)
        self._ticker: asyncio.Task | None = None

    def start(self) -> None:
        self._thread.start()
        self._ticker = asyncio.ensure_future(self._tick())

    async def _tick(self) -> None:
        while True:
            self.loop_seen = time.monotonic()
            await asyncio.sleep(1.0)

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
