"""CORE runtime pieces in-process against the real broker (no subprocesses, no TensorFlow): topology names,
RPC failing on stop, handler failures dead-lettered, registry liveness, model-pool checks."""

from __future__ import annotations

import asyncio
import hashlib

import aio_pika
import numpy as np
import pytest

from splitinfer.actors.actor import Actor
from splitinfer.actors.transport import RemoteError, Stopped
from splitinfer.actors.model_pool.actor import ModelPool
from splitinfer.actors.model_pool.client import PoolClient, PoolError
from splitinfer.actors.model_pool.store import chunk_layout
from splitinfer.actors.registry.actor import Registry
from splitinfer.actors.registry.client import RegistryClient
from splitinfer.actors.transport.topology import Names, escape_key, unescape_key
from splitinfer.messages import ErrorResult, PartChunk, PartRequest, PoolManifest, Reply, decode
from splitinfer.splitter.manifest import Manifest, PartEntry, SourceModel
from splitinfer.config import Settings

from tests.test_runtime_core import pytestmark  # noqa: F401  (skip without a broker)


@pytest.fixture(autouse=True)
def _forget_namespace(namespace):
    """Delete the namespace's core exchanges and queues after each test."""
    yield

    async def run() -> None:
        n = Names(namespace)
        conn = await aio_pika.connect(Settings().broker_url)
        async with conn:
            ch = await conn.channel()
            for q in (n.pool_queue, n.registry_queue, n.dead, n.jobs):
                await ch.queue_delete(q)
            for ex in (n.tensors, n.results, n.control, n.dead):
                await ch.exchange_delete(ex)

    asyncio.run(run())


def _settings(ns: str, **kw) -> Settings:
    return Settings(namespace=ns, queue_expires_s=120, heartbeat_interval_s=0.3, liveness_timeout_s=1.0, **kw)


@pytest.mark.parametrize("name", ["conv/x:0", "a.b.c:1", "x*#%2E.y", "tf.math.add@2:0", "%", ""])
def test_escape_key_round_trip(name):
    esc = escape_key(name)
    assert "." not in esc and "*" not in esc and "#" not in esc
    assert unescape_key(esc) == name
    key = Names("ns").tensor_key("dep.1", name)
    assert key.count(".") == 1


def test_names_are_namespaced():
    n = Names("abc")
    for name in (n.tensors, n.results, n.jobs, n.control, n.dead, n.registry_queue, n.pool_queue,
                 n.part_exchange("d", "p"), n.replica_queue("d", "p", 1)):
        assert name.startswith("abc.")
    # AMQP allows only letters, digits, '-', '_', '.' and ':' in names: a model's plan `m:p0`, a dotted or
    # odd deployment id still give valid names, and different (deployment, part) pairs never share one
    import re

    pairs = [("d.x", "p"), ("d", "x.p"), ("m:p0", "part0"), ("m", "p0:part0"), ("a b/ü%", "p"), ("a", "b")]
    names = [n.replica_queue(d, p, 1) for d, p in pairs] + [n.part_exchange(d, p) for d, p in pairs]
    assert all(re.fullmatch(r"[A-Za-z0-9_.:-]+", x) for x in names), names
    assert len(set(names)) == len(names)


def test_rpc_fails_pending_on_stop_and_handler_errors_are_dead_lettered(namespace):
    async def main() -> None:
        s = _settings(namespace)
        silent = Actor("silent", s)

        async def boom(message):
            raise RuntimeError("handler bug")

        listener = Actor("listener", s)
        await silent.start()
        await listener.start()
        try:
            q = await silent.channel.declare_queue(f"{namespace}.boom", auto_delete=True,
                                                   arguments={"x-dead-letter-exchange": silent.names.dead})
            await q.bind(silent.exchanges["control"], "boom")
            await silent.consume(q, boom)
            errors = await listener.channel.declare_queue(exclusive=True)
            await errors.bind(listener.exchanges["results"], "#")
            # a handler that raises: error result + dead letter, and the actor keeps going
            await listener.publisher.publish("control", "boom", Reply(message="x"), headers={"request_id": "job-7"})
            got = await _get(errors)
            err = decode(got.body)
            assert isinstance(err, ErrorResult) and err.job_id == "job-7" and err.code == "internal"
            assert "handler bug" in err.message and err.where == "silent"
            dead = await listener.channel.declare_queue(listener.names.dead, passive=True)
            assert (await _get(dead)).headers["request_id"] == "job-7"
            # an RPC whose answer never comes fails with Stopped when the caller stops (no hang)
            hang = await listener.channel.declare_queue(f"{namespace}.nobody", auto_delete=True)
            await hang.bind(listener.exchanges["control"], "nobody.home")
            waiter = asyncio.ensure_future(listener.rpc.call("nobody.home", Reply(), timeout=30))
            await asyncio.sleep(0.3)
            await listener.stop()
            with pytest.raises(Stopped):
                await asyncio.wait_for(waiter, 5)
        finally:
            await silent.stop()
            await listener.stop()

    asyncio.run(main())


async def _get(queue, timeout: float = 5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        m = await queue.get(no_ack=True, fail=False)
        if m is not None:
            return m
        assert asyncio.get_running_loop().time() < deadline, f"nothing arrived on {queue.name}"
        await asyncio.sleep(0.05)


def test_registry_liveness_and_deregister(namespace):
    async def main() -> None:
        s = _settings(namespace)
        reg, a, b, client = Registry("registry", s), Actor("a", s), Actor("b", s), Actor("client", s)
        for x in (reg, a, b, client):
            await x.start()
        try:
            await asyncio.sleep(0.8)
            registry = RegistryClient(client.rpc)
            ids = {x.actor_id for x in await registry.who_hosts()}
            assert {"a", "b", "client"} <= ids
            # b goes silent without saying goodbye (its heartbeat task dies as with kill -9)
            for t in list(b._tasks):
                t.cancel()
            await asyncio.sleep(1.3)  # dead after 1 s of silence, forgotten after 2 s
            hosts = {x.actor_id: x.alive for x in await registry.who_hosts(include_dead=True)}
            assert hosts["b"] is False and hosts["a"] is True
            assert "b" not in {x.actor_id for x in await registry.who_hosts()}
            await a.stop()  # a deregisters
            await asyncio.sleep(0.3)
            assert "a" not in {x.actor_id for x in await registry.who_hosts(include_dead=True)}
        finally:
            for x in (client, b, a, reg):
                await x.stop()

    asyncio.run(main())


def test_pool_checks_hashes_names_and_unknown_deployments(namespace, tmp_path):
    async def main() -> None:
        s = _settings(namespace, pool_chunk_bytes=1000)
        pool, c = ModelPool("pool", s, directory=tmp_path / "pool"), Actor("c", s)
        await pool.start()
        await c.start()
        try:
            data = np.random.default_rng(0).bytes(2500)
            good = hashlib.sha256(data).hexdigest()
            count, clen = chunk_layout(len(data), 1000)
            assert (count, clen) == (3, 834)

            async def upload(sha: str, name: str = "p.keras") -> Reply:
                r = None
                for i in range(count):
                    r = await c.rpc.call(Names.POOL_UPLOAD, PartChunk(deployment="d", file=name, index=i, count=count,
                                                                      size=len(data), sha256=sha,
                                                                      data=data[i * clen:(i + 1) * clen]))
                return r

            with pytest.raises(RemoteError, match="sha256"):
                await upload("0" * 64)
            with pytest.raises(RemoteError, match="unsafe"):
                await c.rpc.call(Names.POOL_UPLOAD, PartChunk(deployment="d", file="../evil", index=0, count=1, size=1,
                                                              sha256=good, data=b"x"))
            assert (await upload(good)).ok

            def manifest(sha: str) -> str:
                return Manifest(split_id="d", source=SourceModel(name="m", sha256="0" * 64, origin="test"),
                                inputs=[], outputs=[],
                                parts=[PartEntry(name="part0", file="p.keras", sha256=sha, inputs=[], outputs=[],
                                                 operations=[])]).model_dump_json()

            with pytest.raises(RemoteError, match="sha256"):
                await c.rpc.call(Names.POOL_UPLOAD, PoolManifest(deployment="d", manifest=manifest("1" * 64)))
            with pytest.raises(RemoteError, match="invalid manifest"):
                await c.rpc.call(Names.POOL_UPLOAD, PoolManifest(deployment="d", manifest="{}"))
            assert (await c.rpc.call(Names.POOL_UPLOAD, PoolManifest(deployment="d", manifest=manifest(good)))).ok
            chunk = await c.rpc.call(Names.POOL_REQUEST, PartRequest(deployment="d", file="p.keras", index=2))
            assert isinstance(chunk, PartChunk) and chunk.data == data[2 * clen:]
            other = await c.rpc.call(Names.POOL_REQUEST, PartRequest(deployment="d", file="manifest.json", index=0))
            assert isinstance(other, PoolManifest)
            with pytest.raises(RemoteError, match="not a part file"):
                await c.rpc.call(Names.POOL_REQUEST, PartRequest(deployment="d", file="secret.txt"))
            with pytest.raises(PoolError):
                await PoolClient(c.rpc, 1000).fetch_deployment("nope", tmp_path / "dest")
        finally:
            await c.stop()
            await pool.stop()

    asyncio.run(main())
