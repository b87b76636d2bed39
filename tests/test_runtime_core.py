"""The CORE runtime end to end: real RabbitMQ, real model-server / registry / model-pool processes, one namespace
per test. A small test driver stands in for the front end: it publishes the input tensors of each request on
`<ns>.tensors` (header request_id) and collects the final output tensors from a queue bound to their keys, plus
every ErrorResult from `<ns>.results`.

(1) MobileNetV3Large in 5 parts on 5 processes, parts fetched from the model pool: 100 requests, all within 1e-5
    of the local full model, none lost or duplicated; the registry knows who hosts what.
(2) Fork/join DAG, fork branches on different servers, join with 2 replicas on 2 processes: 200 requests at
    concurrency 16, all correct.
(3) kill -9 one join replica while requests are in flight: every request completes, none lost, none answered twice.
(4) malformed message, wrong-shaped tensor, oversized tensor (and a join input whose partner never comes): each
    gets a clear ErrorResult and lands in `<ns>.dead`; the server keeps serving.
(5) the broker closes a server's connection: it reconnects and serves on.
(6) cuts sent compressed (int8, float16) travel smaller and come back as the model's dtype.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

aio_pika = pytest.importorskip("aio_pika")

from splitinfer.actors.actor import Actor  # noqa: E402
from splitinfer.actors.model_pool.client import PoolClient  # noqa: E402
from splitinfer.actors.model_server.client import ServerOrders  # noqa: E402
from splitinfer.actors.registry.client import RegistryClient  # noqa: E402
from splitinfer.actors.transport.topology import Names  # noqa: E402
from splitinfer.messages import ErrorResult, TensorMessage, decode, encode  # noqa: E402
from splitinfer.config import Settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BROKER = Settings().broker_url


def _broker_up() -> bool:
    async def probe() -> bool:
        try:
            conn = await aio_pika.connect(BROKER, timeout=3)
            await conn.close()
            return True
        except Exception:
            return False

    return asyncio.run(probe())


pytestmark = pytest.mark.skipif(not _broker_up(), reason=f"no RabbitMQ at {BROKER}")


# ---------------------------------------------------------------------------------------------- models & splits

def _fork_join_model():
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


@pytest.fixture(scope="session")
def dag_split(tmp_path_factory):
    """part0 = stem (the fork), part1 = branch_a, part2 = branch_b, part3 = join + head (2 inputs)."""
    from splitinfer.splitter import ModelGraph, save_split, split_by_groups

    graph = ModelGraph(_fork_join_model())
    group = {"stem": 0, "branch_a": 1, "branch_b": 2}
    specs = split_by_groups(graph, {n: group.get(n, 3) for n in graph.compute_nodes})
    out = tmp_path_factory.mktemp("dag")
    manifest = save_split(graph, specs, out, origin="test:forkjoin")
    assert [len(p.inputs) for p in manifest.parts] == [1, 1, 1, 2]
    return out


@pytest.fixture(scope="session")
def mnv3_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnv3") / "split"
    subprocess.run([str(Path(PY).parent / "splitinfer"), "split", "keras.applications:MobileNetV3Large", "--parts", "5",
                    "-o", str(out)], check=True, cwd=REPO, capture_output=True, timeout=300)
    return out


def _reference(split_dir: Path, x: np.ndarray) -> np.ndarray:
    from splitinfer import _tf  # noqa: F401
    import keras

    from splitinfer.splitter.manifest import Manifest

    manifest = Manifest.load(split_dir)
    model = keras.saving.load_model(split_dir / manifest.source.file, safe_mode=True, compile=False)
    return np.concatenate([np.asarray(model(x[i:i + 25], training=False)) for i in range(0, len(x), 25)])


# ---------------------------------------------------------------------------------------------- processes

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
        out = []
        for line in (self.logdir / f"{name}.log").read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

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


@pytest.fixture
def cluster_factory(namespace, tmp_path):
    made: list[Cluster] = []

    def make(**env) -> Cluster:
        c = Cluster(namespace, tmp_path, **env)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
        if c.deployment_parts:
            c.forget(*c.deployment_parts)


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

    async def setup(self) -> None:
        q = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        for t in self.manifest.outputs:
            await q.bind(self.exchanges["tensors"], self.names.tensor_key(self.deployment, t.name))
        await q.bind(self.exchanges["results"], "#")
        await self.consume(q, self._on_message)

    async def _on_message(self, message) -> None:
        msg = decode(message.body)
        await self.deliveries.ack(message)
        if isinstance(msg, ErrorResult):
            self.errors.append(msg)
            fut = self.waiters.get(msg.job_id or "")
            if fut is not None and not fut.done():
                fut.set_exception(AssertionError(f"error result for {msg.job_id}: {msg.code}: {msg.message}"))
            return
        assert isinstance(msg, TensorMessage)
        rid = msg.request_id
        self.received[(rid, msg.tensor)] += 1
        if msg.tensor in self.finals[rid]:
            return  # a redelivered duplicate: the first result wins
        self.finals[rid][msg.tensor] = msg.array
        if len(self.finals[rid]) == len(self.manifest.outputs):
            self.answered[rid] += 1
            fut = self.waiters.get(rid)
            if fut is not None and not fut.done():
                fut.set_result(dict(self.finals[rid]))

    async def send(self, rid: str, inputs: dict[str, np.ndarray]) -> None:
        for name, arr in inputs.items():
            await self.publisher.publish("tensors", self.names.tensor_key(self.deployment, name),
                               TensorMessage(request_id=rid, deployment=self.deployment, tensor=name, array=arr),
                               headers={"request_id": rid})

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


def _settings(ns: str) -> Settings:
    return Settings(namespace=ns, queue_expires_s=600, heartbeat_interval_s=1.0)


def _check_outputs(results: dict[str, np.ndarray], ref: np.ndarray, prefix: str, tol: float) -> float:
    assert len(results) == len(ref), f"{len(ref) - len(results)} requests lost"
    worst = 0.0
    for i in range(len(ref)):
        got = results[f"{prefix}{i}"]
        assert got.shape == ref[i:i + 1].shape
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - ref[i:i + 1]))))
    assert worst <= tol, f"max abs error {worst} > {tol}"
    return worst


def _no_duplicates(driver: Driver) -> None:
    assert all(n == 1 for n in driver.answered.values()), "a request was answered twice"


# ---------------------------------------------------------------------------------------------- (1)

def test_mobilenetv3_five_parts_five_processes_via_pool(mnv3_split, cluster_factory, namespace, tmp_path):
    """Servers start empty; the split goes to the model pool; LoadPart orders make each server fetch its part
    over the broker (no shared disk) and serve it."""
    from splitinfer.splitter.manifest import Manifest

    manifest = Manifest.load(mnv3_split)
    cluster = cluster_factory(SPLITINFER_POOL_DIR=tmp_path / "pool", SPLITINFER_CACHE_DIR=tmp_path / "cache")
    cluster.deployment_parts = ("mnv3", [(p.name, 1) for p in manifest.parts])
    cluster.start("registry", "registry")
    cluster.start("pool", "model_pool")
    for i in range(5):
        cluster.start(f"s{i}", "model_server", "--id", f"s{i}", "--site", "edge")
    rng = np.random.default_rng(0)
    xs = rng.uniform(0, 1, size=(100, 224, 224, 3)).astype(np.float32)
    ref = _reference(mnv3_split, xs)  # the local full model, while the actors start
    for name in ("registry", "pool", *(f"s{i}" for i in range(5))):
        cluster.wait_for(name, "started")

    async def main() -> None:
        driver = Driver(_settings(namespace), "mnv3", manifest)
        await driver.start()
        try:
            dep = await PoolClient(driver.rpc, driver.settings.pool_chunk_bytes).upload_split(mnv3_split, "mnv3")
            assert dep == "mnv3"
            orders = ServerOrders(driver.rpc, driver.names)
            replies = await orders.load(dep, {p.name: [f"s{i}"] for i, p in enumerate(manifest.parts)})
            assert all(r.ok for r in replies.values()), replies
            hosts = await RegistryClient(driver.rpc).who_hosts(deployment=dep)
            hosting = {a.actor_id: [p.part for p in a.parts] for a in hosts}
            assert hosting == {f"s{i}": [f"part{i}"] for i in range(5)}
            t0 = time.perf_counter()
            results = await driver.run_many(xs, concurrency=8, prefix="m")
            elapsed = time.perf_counter() - t0
            await asyncio.sleep(0.5)  # anything late would be a duplicate
            worst = _check_outputs(results, ref, "m", 1e-5)
            _no_duplicates(driver)
            assert set(driver.received.values()) == {1}, "a final output was delivered twice"
            assert not driver.errors, driver.errors[:3]
            print(f"\n100 requests over 5 processes in {elapsed:.2f}s, max abs error {worst:.2e}")
        finally:
            await driver.stop()

    asyncio.run(main())
    codes = cluster.stop()
    assert all(c == 0 for c in codes.values()), f"unclean exits: {codes}"  # SIGTERM -> graceful stop
    for i in range(5):  # each part came over the broker into the server's own cache, hash-checked
        assert (tmp_path / "cache" / "parts" / namespace / "mnv3" / manifest.parts[i].file).exists()


# ---------------------------------------------------------------------------------------------- (2)

def _dag_reference(dag_split: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    xs = np.random.default_rng(seed).uniform(0, 1, size=(n, 16, 16, 3)).astype(np.float32)
    return xs, _reference(dag_split, xs)


def test_dag_join_two_replicas_branches_on_different_servers(dag_split, cluster_factory, namespace):
    from splitinfer.splitter.manifest import Manifest

    manifest = Manifest.load(dag_split)
    cluster = cluster_factory()
    cluster.deployment_parts = ("dag", [("part0", 1), ("part1", 1), ("part2", 1), ("part3", 2)])
    # fork (part0) and branch_a on a, branch_b on b; the join (part3) has replica 0 on a and replica 1 on b
    cluster.start("a", "model_server", "--id", "a", "--split-dir", str(dag_split), "--deployment", "dag",
                  "--part", "part0,part1,part3@0/2")
    cluster.start("b", "model_server", "--id", "b", "--split-dir", str(dag_split), "--deployment", "dag",
                  "--part", "part2,part3@1/2")
    xs, ref = _dag_reference(dag_split, 200, 1)
    for name, n in (("a", 3), ("b", 2)):
        cluster.wait_for(name, "part_loaded", n)

    async def main() -> None:
        driver = Driver(_settings(namespace), "dag", manifest)
        await driver.start()
        try:
            results = await driver.run_many(xs, concurrency=16, prefix="d")
            await asyncio.sleep(0.5)
            _check_outputs(results, ref, "d", 1e-5)
            _no_duplicates(driver)
            assert not driver.errors, driver.errors[:3]
        finally:
            await driver.stop()

    asyncio.run(main())
    codes = cluster.stop()
    assert codes == {"a": 0, "b": 0}
    # both join replicas did work: the consistent-hash exchange spread requests over the two queues
    for name in ("a", "b"):
        stopped = [e for e in cluster.events(name) if e.get("event") == "stopped"]
        assert stopped and stopped[0]["processed"] > 0


# ---------------------------------------------------------------------------------------------- (3)

def test_kill9_join_replica_in_flight(dag_split, cluster_factory, namespace):
    from splitinfer.splitter.manifest import Manifest

    manifest = Manifest.load(dag_split)
    cluster = cluster_factory()
    cluster.deployment_parts = ("dag", [("part0", 1), ("part1", 1), ("part2", 1), ("part3", 2)])
    common = ["--split-dir", str(dag_split), "--deployment", "dag"]
    cluster.start("registry", "registry")
    cluster.start("front", "model_server", "--id", "front", *common, "--part", "part0,part1,part2")
    cluster.start("j0", "model_server", "--id", "j0", *common, "--part", "part3@0/2")
    cluster.start("j1", "model_server", "--id", "j1", *common, "--part", "part3@1/2")
    xs, ref = _dag_reference(dag_split, 300, 2)
    cluster.wait_for("front", "part_loaded", 3)
    for name in ("j0", "j1"):
        cluster.wait_for(name, "standby")  # each replica also waits, as standby, on the other's queue

    killed_at: list[int] = []

    def maybe_kill(done: int) -> None:
        if done >= 60 and not killed_at:
            cluster.procs["j0"].send_signal(signal.SIGKILL)
            killed_at.append(done)

    async def main() -> None:
        driver = Driver(_settings(namespace), "dag", manifest)
        await driver.start()
        try:
            results = await driver.run_many(xs, concurrency=16, prefix="k", on_done=maybe_kill, timeout=90)
            await asyncio.sleep(1.0)
            assert killed_at, "the replica was never killed"
            _check_outputs(results, ref, "k", 1e-5)
            _no_duplicates(driver)
            assert not driver.errors, driver.errors[:3]
            dups = sum(n - 1 for n in driver.received.values())
            print(f"\nkilled j0 after {killed_at[0]} answers; {dups} duplicate final deliveries (first wins)")
            assert cluster.procs["j0"].wait(5) == -signal.SIGKILL
            # the registry notices: no heartbeat from j0 within the liveness timeout (3 s here)
            registry = RegistryClient(driver.rpc)
            deadline = time.time() + 15
            while True:
                hosts = await registry.who_hosts(deployment="dag", part="part3", include_dead=True)
                alive = {a.actor_id: a.alive for a in hosts}
                if alive.get("j0") is False or time.time() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert alive == {"j0": False, "j1": True}, alive
            live = await registry.who_hosts(deployment="dag", part="part3")
            assert [a.actor_id for a in live] == ["j1"]
            # j0 comes back (as a supervisor would restart it): j1 gives its queue back, j0 serves again
            cluster.start("j0b", "model_server", "--id", "j0", *common, "--part", "part3@0/2")
            await asyncio.to_thread(cluster.wait_for, "j0b", "part_loaded")
            await asyncio.to_thread(cluster.wait_for, "j1", "queue_given_back")
            xs2, ref2 = _dag_reference(dag_split, 60, 4)
            again = await driver.run_many(xs2, concurrency=8, prefix="again")
            _check_outputs(again, ref2, "again", 1e-5)
            # graceful stop while requests are in flight: SIGTERM hands j0's work back, nothing is lost
            termed: list[int] = []

            def maybe_term(done: int) -> None:
                if done >= 20 and not termed:
                    cluster.procs["j0b"].send_signal(signal.SIGTERM)
                    termed.append(done)

            xs3, ref3 = _dag_reference(dag_split, 100, 5)
            last = await driver.run_many(xs3, concurrency=16, prefix="term", on_done=maybe_term)
            _check_outputs(last, ref3, "term", 1e-5)
            assert await asyncio.to_thread(cluster.procs["j0b"].wait, 20) == 0  # a clean exit
            _no_duplicates(driver)
            assert not driver.errors, driver.errors[:3]
        finally:
            await driver.stop()

    asyncio.run(main())
    codes = cluster.stop()
    assert codes == {"registry": 0, "front": 0, "j0": -signal.SIGKILL, "j1": 0, "j0b": 0}
    stopped = {n: [e for e in cluster.events(n) if e.get("event") == "stopped"][0] for n in ("j1", "j0b")}
    assert stopped["j0b"]["processed"] > 0, stopped  # the returned replica got its queue back
    assert stopped["j1"].get("redelivered", 0) > 0, stopped  # j0 died with inputs in flight; j1 got them


# ---------------------------------------------------------------------------------------------- (4)

def test_bad_messages_get_error_results_and_dead_letter(dag_split, cluster_factory, namespace):
    from splitinfer.splitter.manifest import Manifest

    manifest = Manifest.load(dag_split)
    limit = 200_000
    cluster = cluster_factory(SPLITINFER_MAX_MESSAGE_BYTES=limit, SPLITINFER_JOIN_TIMEOUT_S=2)
    cluster.deployment_parts = ("dag", [("part0", 1), ("part1", 1), ("part2", 1), ("part3", 1)])
    cluster.start("s", "model_server", "--id", "s", "--split-dir", str(dag_split), "--deployment", "dag",
                  "--part", "part0,part1,part2,part3")
    xs, ref = _dag_reference(dag_split, 20, 3)
    cluster.wait_for("s", "part_loaded", 4)
    names = None

    async def main() -> None:
        nonlocal names
        driver = Driver(_settings(namespace), "dag", manifest)
        await driver.start()
        names = driver.names
        try:
            before = await driver.run_many(xs[:10], concurrency=4, prefix="ok")
            # the same request again (as after a redelivery): acked without recomputing, no second output
            await driver.send("ok3", {"img:0": xs[3:4]})
            key = names.tensor_key("dag", "img:0")
            # malformed: not msgpack at all
            await driver.publisher.publish("tensors", key, b"\xc1\xff not msgpack", headers={"request_id": "bad-malformed"})
            # wrong shape: a valid message whose tensor is 8x8 instead of 16x16
            await driver.send("bad-shape", {"img:0": np.zeros((1, 8, 8, 3), np.float32)})
            # oversized: a 16x160x160x3 float32 tensor (4.9 MB) against a 200 kB limit
            await driver.send("bad-big", {"img:0": np.zeros((16, 160, 160, 3), np.float32)})
            # a join input whose partner never comes: join timeout (2 s here)
            await driver.publisher.publish("tensors", names.tensor_key("dag", "branch_a:0"),
                                 TensorMessage(request_id="bad-lonely", deployment="dag", tensor="branch_a:0",
                                               array=np.zeros((1, 16, 16, 8), np.float32)),
                                 headers={"request_id": "bad-lonely"})
            after = await driver.run_many(xs[10:], concurrency=4, prefix="ok2")  # still serving
            # 48 requests' first join inputs before any second one: more partial joins than the prefetch (32);
            # the join consumer's own prefetch leaves room for the inputs that complete them (no stall)
            loop = asyncio.get_running_loop()
            waits = {f"pre{i}": loop.create_future() for i in range(48)}
            driver.waiters.update(waits)
            for tensor in ("branch_a:0", "branch_b:0"):
                for rid in waits:
                    await driver.publisher.publish("tensors", names.tensor_key("dag", tensor),
                                         TensorMessage(request_id=rid, deployment="dag", tensor=tensor,
                                                       array=np.ones((1, 16, 16, 8), np.float32)),
                                         headers={"request_id": rid})
            done = await asyncio.wait_for(asyncio.gather(*waits.values()), 20)
            assert len(done) == 48 and all(np.allclose(d["head:0"], done[0]["head:0"]) for d in done)
            deadline = time.time() + 10
            while len(driver.errors) < 4 and time.time() < deadline:
                await asyncio.sleep(0.1)
            by_job = {e.job_id: e for e in driver.errors}
            assert set(by_job) == {"bad-malformed", "bad-shape", "bad-big", "bad-lonely"}, driver.errors
            assert by_job["bad-malformed"].code == "bad_message"
            assert by_job["bad-shape"].code == "wrong_shape" and "(1, 8, 8, 3)" in by_job["bad-shape"].message
            assert by_job["bad-big"].code == "too_large" and str(limit) in by_job["bad-big"].message
            assert by_job["bad-lonely"].code == "join_timeout" and "branch_b:0" in by_job["bad-lonely"].message
            for e in by_job.values():
                assert e.where == "s" and "\n" not in e.message
            # all four are in the dead-letter queue, with their request ids
            dlq = await driver.channel.declare_queue(names.dead, passive=True)
            dead = []
            while True:
                m = await dlq.get(no_ack=True, fail=False)
                if m is None:
                    break
                dead.append((m.headers or {}).get("request_id"))
            assert sorted(dead) == sorted(["bad-malformed", "bad-shape", "bad-big", "bad-lonely"]), dead
            _check_outputs({**before, **{f"ok{10 + int(k[3:])}": v for k, v in after.items()}}, ref, "ok", 1e-5)
            assert driver.received[("ok3", "head:0")] == 1
        finally:
            await driver.stop()

    asyncio.run(main())
    assert cluster.procs["s"].poll() is None, "the server died"
    assert cluster.stop() == {"s": 0}
    dup = [e for e in cluster.events("s") if e.get("event") == "duplicate"]
    assert [e["request_id"] for e in dup] == ["ok3"] and dup[0]["part"] == "part0"


# ---------------------------------------------------------------------------------------------- (5)

@pytest.mark.skipif(not shutil.which("rabbitmqctl"), reason="needs rabbitmqctl to force-close a connection")
def test_server_survives_broker_closing_its_connection(dag_split, cluster_factory, namespace):
    """The broker drops the server's connection mid-run: the robust connection comes back, the broker requeued
    whatever was unacked, every request still completes correctly."""
    from splitinfer.splitter.manifest import Manifest

    manifest = Manifest.load(dag_split)
    cluster = cluster_factory()
    cluster.deployment_parts = ("dag", [("part0", 1), ("part1", 1), ("part2", 1), ("part3", 1)])
    cluster.start("s", "model_server", "--id", "s", "--split-dir", str(dag_split), "--deployment", "dag",
                  "--part", "part0,part1,part2,part3")
    xs, ref = _dag_reference(dag_split, 1000, 6)
    cluster.wait_for("s", "part_loaded", 4)
    closed: list[int] = []

    def close_connection() -> None:
        out = subprocess.run(["rabbitmqctl", "list_connections", "-q", "pid", "client_properties"],
                             capture_output=True, text=True, timeout=30).stdout
        # exactly this test's server (other runs share the broker): connection_name is kind:id@namespace
        pids = [line.split("\t")[0] for line in out.splitlines() if f'"model_server:s@{namespace}"' in line]
        for pid in pids:
            subprocess.run(["rabbitmqctl", "close_connection", pid, "test"], capture_output=True, timeout=30)
        closed.extend(pids)

    started: list[asyncio.Future] = []

    def on_done(done: int) -> None:
        if done == 50:
            started.append(asyncio.get_running_loop().run_in_executor(None, close_connection))

    async def main() -> None:
        driver = Driver(_settings(namespace), "dag", manifest)
        await driver.start()
        try:
            results = await driver.run_many(xs, concurrency=8, prefix="c", on_done=on_done, timeout=90)
            await started[0]
            _check_outputs(results, ref, "c", 1e-5)
            _no_duplicates(driver)
            assert not driver.errors, driver.errors[:3]
        finally:
            await driver.stop()

    asyncio.run(main())
    assert closed, "no connection was closed"
    assert cluster.stop() == {"s": 0}
    log = (cluster.logdir / "s.log").read_text()
    assert "CONNECTION_FORCED" in log
    # redelivered inputs were acked as done or settled with the running original: each of the 4 parts computed
    # each of the 1000 requests exactly once
    stopped = [e for e in cluster.events("s") if e.get("event") == "stopped"][0]
    assert stopped["processed"] == 4000, stopped


# ---------------------------------------------------------------------------------------------- (6)

def test_compressed_cuts_travel_smaller_and_come_back_as_the_models_dtype(dag_split, cluster_factory, namespace,
                                                                         tmp_path):
    """A plan may send a cut compressed (manifest PartOutput.codec): the fork's output goes as int8 with a scale,
    branch_a's as float16; the parts behind them get float32 back and the answers stay within the codecs' error.
    A compressed tensor whose scale is missing gets a clear error result and the server keeps serving."""
    from splitinfer.splitter.manifest import Manifest

    split = tmp_path / "compressed"
    shutil.copytree(dag_split, split)
    manifest = Manifest.load(split)
    codecs = {"stem:0": "int8", "branch_a:0": "float16"}
    for part in manifest.parts:
        for o in part.outputs:
            o.codec = codecs.get(o.name)
    manifest.save(split)
    cluster = cluster_factory()
    cluster.deployment_parts = ("cdag", [("part0", 1), ("part1", 1), ("part2", 1), ("part3", 1)])
    cluster.start("s", "model_server", "--id", "s", "--split-dir", str(split), "--deployment", "cdag",
                  "--part", "part0,part1,part2,part3")
    xs, ref = _dag_reference(dag_split, 12, 5)
    cluster.wait_for("s", "part_loaded", 4)

    async def main() -> None:
        driver = Driver(_settings(namespace), "cdag", manifest)
        await driver.start()
        wire: dict[str, list[TensorMessage]] = collections.defaultdict(list)
        spy = await driver.channel.declare_queue(exclusive=True, auto_delete=True)
        for t in codecs:
            await spy.bind(driver.exchanges["tensors"], driver.names.tensor_key("cdag", t))

        async def on_wire(message) -> None:
            msg = decode(message.body)
            wire[msg.tensor].append(msg)

        await spy.consume(on_wire, no_ack=True)
        try:
            results = await driver.run_many(xs, concurrency=4, prefix="c")
            # int8 at the fork (error <= scale / 2 per element) and float16 on a branch: close, not exact
            err = _check_outputs(results, ref, "c", 5e-2 * float(np.max(np.abs(ref))))
            assert err > 0
            await asyncio.sleep(0.3)
            stem, branch = wire["stem:0"][0], wire["branch_a:0"][0]
            assert stem.codec == "int8" and stem.array.dtype == np.int8 and stem.scale > 0
            assert branch.codec == "float16" and branch.array.dtype == np.float16 and branch.scale is None
            assert stem.array.nbytes * 4 == 1 * 16 * 16 * 8 * 4  # a quarter of the float32 bytes on the wire
            # the int8 stem without its scale: refused with a clear error, dead-lettered; the server goes on
            bad = TensorMessage(request_id="c-noscale", deployment="cdag", tensor="stem:0",
                                array=np.zeros((1, 16, 16, 8), np.int8), codec="int8")
            await driver.publisher.publish("tensors", driver.names.tensor_key("cdag", "stem:0"), bad,
                                 headers={"request_id": "c-noscale"})
            again = await driver.run_many(xs[:3], concurrency=2, prefix="c2")
            assert set(again) == {"c20", "c21", "c22"}
            deadline = time.time() + 10
            while len(driver.errors) < 2 and time.time() < deadline:
                await asyncio.sleep(0.1)
            # one error from each part that takes the stem (both branches)
            assert sorted((e.job_id, e.code) for e in driver.errors) == [("c-noscale", "bad_codec")] * 2
            assert all("scale" in e.message for e in driver.errors)
            _no_duplicates(driver)
        finally:
            await driver.stop()

    asyncio.run(main())
    assert cluster.stop() == {"s": 0}
