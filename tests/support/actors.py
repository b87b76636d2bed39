"""Actor processes and a test driver for the runtime's end-to-end tests.

`Cluster` starts actor processes (`python -m splitinfer.actors.<module>`) in one namespace, logs in files, and stops
them (SIGTERM, then SIGKILL). `Driver` stands in for the front end: it publishes the input tensors of each request
on `<ns>.tensors` (header request_id) and collects the final output tensors from a queue bound to their keys, plus
every ErrorResult from `<ns>.results`. The fork/join model and its split are what most of those tests run.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
import numpy as np

from splitinfer.actors.actor import Actor
from splitinfer.actors.transport.log import read_log_events
from splitinfer.actors.transport.topology import Names
from splitinfer.config import Settings
from splitinfer.messages import ErrorResult, decode
from splitinfer.messages.frames import TENSORS, decode_frame, encode_frame, is_frame

from tests.support import REPO
from tests.support.broker import BROKER

PY = sys.executable


# ---------------------------------------------------------------------------------------------- models & splits

def fork_join_model():
    from splitinfer import _tf  # noqa: F401
    import keras
    from keras import layers

    keras.utils.set_random_seed(7)
    inp = keras.Input((16, 16, 3), name="img")
    x = layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    a = layers.Conv2D(8, 3, padding="same", activation="relu", name="branch_a")(x)
    b = layers.Conv2D(8, 1, activation="tanh", name="branch_b")(x)
    j = layers.Add(name="join")([a, b])
    out = layers.Dense(10, name="head")(layers.GlobalAveragePooling2D(name="pool")(j))
    return keras.Model(inp, out, name="forkjoin")


def build_dag_split(out: Path) -> Path:
    """part0 = stem (the fork), part1 = branch_a, part2 = branch_b, part3 = join + head (2 inputs)."""
    from splitinfer.splitter import ModelGraph, save_split, split_by_groups

    graph = ModelGraph(fork_join_model())
    group = {"stem": 0, "branch_a": 1, "branch_b": 2}
    specs = split_by_groups(graph, {n: group.get(n, 3) for n in graph.compute_nodes})
    manifest = save_split(graph, specs, out, origin="test:forkjoin")
    assert [len(p.inputs) for p in manifest.parts] == [1, 1, 1, 2]
    return out


def build_mnv3_split(out: Path) -> Path:
    """MobileNetV3Large in 5 parts, split by the CLI as a user would."""
    subprocess.run([str(Path(PY).parent / "splitinfer"), "split", "keras.applications:MobileNetV3Large", "--parts", "5",
                    "-o", str(out)], check=True, cwd=REPO, capture_output=True, timeout=300)
    return out


def reference(split_dir: Path, x: np.ndarray) -> np.ndarray:
    from splitinfer import _tf  # noqa: F401
    import keras

    from splitinfer.splitter.manifest import Manifest

    manifest = Manifest.load(split_dir)
    model = keras.saving.load_model(split_dir / manifest.source.file, safe_mode=True, compile=False)
    return np.concatenate([np.asarray(model(x[i:i + 25], training=False)) for i in range(0, len(x), 25)])


def dag_reference(dag_split: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    xs = np.random.default_rng(seed).uniform(0, 1, size=(n, 16, 16, 3)).astype(np.float32)
    return xs, reference(dag_split, xs)


# ---------------------------------------------------------------------------------------------- processes

log_events = read_log_events  # the structured lines of an actor's log (the reader beside the writer)


class Cluster:
    """Actor processes of one test: started in parallel, logs in files, SIGTERM then SIGKILL at the end."""

    def __init__(self, ns: str, logdir: Path, **env):
        self.ns = ns
        self.logdir = logdir
        self.env = dict(os.environ)
        self.env.update({
            "SPLITINFER_NAMESPACE": ns, "SPLITINFER_QUEUE_EXPIRES_S": "600", "SPLITINFER_HEARTBEAT_INTERVAL_S": "1",
            "SPLITINFER_LIVENESS_TIMEOUT_S": "3", "SPLITINFER_STANDBY_DELAY_S": "1", "PYTHONUNBUFFERED": "1",
        })
        self.env.update({k: str(v) for k, v in env.items()})
        self.procs: dict[str, subprocess.Popen] = {}
        self.deployment_parts: tuple[str, list[tuple[str, int]]] | None = None  # what to delete at the end

    def start(self, name: str, module: str, *args: str) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        p = subprocess.Popen([PY, "-m", f"splitinfer.actors.{module}", *args], env=self.env, cwd=REPO,
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs[name] = p
        return p

    def events(self, name: str) -> list[dict]:
        return log_events(self.logdir / f"{name}.log")

    def wait_for(self, name: str, event: str, count: int = 1, timeout: float = 150.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if sum(e.get("event") == event for e in self.events(name)) >= count:
                return
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.2)
        tail = (self.logdir / f"{name}.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"{name} did not log {count} x {event!r} (exit {self.procs[name].poll()}):\n{tail}")

    def forget(self, deployment: str, parts: list[tuple[str, int]]) -> None:
        """Delete the namespace's exchanges and queues once the processes are gone (queues also expire)."""
        names = Names(self.ns)

        async def run() -> None:
            conn = await aio_pika.connect(BROKER)
            async with conn:
                ch = await conn.channel()
                for part, replicas in parts:
                    for k in range(replicas):
                        await ch.queue_delete(names.replica_queue(deployment, part, k))
                    await ch.exchange_delete(names.part_exchange(deployment, part))
                servers = [f"{self.ns}.server.{p}" for p in self.procs]
                for q in (names.dead, names.jobs, names.registry_queue, names.pool_queue, *servers):
                    await ch.queue_delete(q)
                for ex in (names.tensors, names.results, names.control, names.dead):
                    await ch.exchange_delete(ex)

        asyncio.run(run())

    def stop(self) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait()
        return codes


# ---------------------------------------------------------------------------------------------- the test driver

class Driver(Actor):
    """Stands in for the front end: sends input tensors, collects final outputs (first wins) and errors."""

    kind = "test_driver"

    def __init__(self, settings: Settings, deployment: str, manifest):
        super().__init__("driver", settings)
        self.deployment = deployment
        self.manifest = manifest
        self.finals: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
        self.received: collections.Counter = collections.Counter()  # (request, tensor) -> times received
        self.errors: list[ErrorResult] = []
        self.waiters: dict[str, asyncio.Future] = {}
        self.answered: collections.Counter = collections.Counter()
        self.hops: dict[str, list] = {}  # request -> the hops of its answer (where its time went, batch sizes)

    async def setup(self) -> None:
        q = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        for t in self.manifest.outputs:  # final outputs that leave from several parts come as tensors
            await q.bind(self.exchanges["tensors"], self.names.tensor_key(self.deployment, t.name))
        await q.bind(self.exchanges["results"], "#")
        await self.consume(q, self._on_message)

    async def _on_message(self, message) -> None:
        await self.deliveries.ack(message)
        if not is_frame(message.body):
            msg = decode(message.body)
            assert isinstance(msg, ErrorResult), msg
            self.errors.append(msg)
            fut = self.waiters.get(msg.job_id or "")
            if fut is not None and not fut.done():
                fut.set_exception(AssertionError(f"error result for {msg.job_id}: {msg.code}: {msg.message}"))
            return
        frame = decode_frame(message.body)  # the answer (a result frame), or final outputs as tensor frames
        rid = frame.request_id
        self.hops.setdefault(rid, frame.hops)
        for tensor, array in frame.arrays.items():
            self.received[(rid, tensor)] += 1
            if tensor in self.finals[rid]:
                continue  # a redelivered duplicate: the first result wins
            self.finals[rid][tensor] = array
            if len(self.finals[rid]) == len(self.manifest.outputs):
                self.answered[rid] += 1
                fut = self.waiters.get(rid)
                if fut is not None and not fut.done():
                    fut.set_result(dict(self.finals[rid]))

    async def send(self, rid: str, inputs: dict[str, np.ndarray]) -> None:
        meta = {"rid": rid, "job": rid, "dep": self.deployment, "rt": self.id, "err": self.id}
        for name, arr in inputs.items():
            await self.publisher.publish("tensors", self.names.tensor_key(self.deployment, name),
                                         encode_frame(TENSORS, meta, {name: arr}), headers={"request_id": rid})

    async def infer(self, rid: str, inputs: dict[str, np.ndarray], timeout: float = 60.0) -> dict[str, np.ndarray]:
        fut = self.waiters[rid] = asyncio.get_running_loop().create_future()
        await self.send(rid, inputs)
        return await asyncio.wait_for(fut, timeout)

    async def run_many(self, xs: np.ndarray, concurrency: int, prefix: str = "r", timeout: float = 60.0,
                       on_done=None) -> dict[str, np.ndarray]:
        name = self.manifest.inputs[0].name
        out_name = self.manifest.outputs[0].name
        sem = asyncio.Semaphore(concurrency)
        results: dict[str, np.ndarray] = {}

        async def one(i: int) -> None:
            async with sem:
                rid = f"{prefix}{i}"
                got = await self.infer(rid, {name: xs[i:i + 1]}, timeout)
                results[rid] = got[out_name]
                if on_done is not None:
                    on_done(len(results))

        await asyncio.gather(*(one(i) for i in range(len(xs))))
        return results


def core_settings(ns: str) -> Settings:
    """The driver's settings: heartbeats every second, like the Cluster's actors."""
    return Settings(namespace=ns, queue_expires_s=600, heartbeat_interval_s=1.0)


def check_outputs(results: dict[str, np.ndarray], ref: np.ndarray, prefix: str, tol: float) -> float:
    """Every request `<prefix><i>` answered, each within tol of ref[i]; returns the worst error."""
    assert len(results) == len(ref), f"{len(ref) - len(results)} requests lost"
    worst = 0.0
    for i in range(len(ref)):
        got = results[f"{prefix}{i}"]
        assert got.shape == ref[i:i + 1].shape
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - ref[i:i + 1]))))
    assert worst <= tol, f"max abs error {worst} > {tol}"
    return worst


def no_duplicates(driver: Driver) -> None:
    assert all(n == 1 for n in driver.answered.values()), "a request was answered twice"
