"""The CORE runtime end to end: real RabbitMQ, real model-server / registry / model-pool processes, one namespace
per test. A test driver (tests/support/actors.py) stands in for the front end: it publishes each request's input
tensors on `<ns>.tensors` and collects the final output tensors and every ErrorResult.

(1) MobileNetV3Large in 5 parts on 5 processes, parts fetched from the model pool: 100 requests, all within 1e-5
    of the local full model, none lost or duplicated; the registry knows who hosts what.
(2) Fork/join DAG, fork branches on different servers, join with 2 replicas on 2 processes: 200 requests at
    concurrency 16, all correct.
(3) cuts sent compressed (int8, float16) travel smaller and come back as the model's dtype.

Bad messages: e2e/test_bad_messages.py; kill -9 and a dropped connection: e2e/test_fault_recovery.py.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import time

import numpy as np
import pytest

aio_pika = pytest.importorskip("aio_pika")

from splitinfer.actors.model_pool.client import PoolClient  # noqa: E402
from splitinfer.actors.model_server.client import ServerOrders  # noqa: E402
from splitinfer.actors.registry.client import RegistryClient  # noqa: E402
from splitinfer.messages.frames import TENSORS, Frame, decode_frame, encode_frame  # noqa: E402
from tests.support.actors import Driver  # noqa: E402
from tests.support.actors import check_outputs as _check_outputs  # noqa: E402
from tests.support.actors import core_settings as _settings  # noqa: E402
from tests.support.actors import dag_reference as _dag_reference  # noqa: E402
from tests.support.actors import no_duplicates as _no_duplicates  # noqa: E402
from tests.support.actors import reference as _reference  # noqa: E402
from tests.support.broker import requires_broker  # noqa: E402
from tests.support.waiting import eventually  # noqa: E402

pytestmark = requires_broker


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
            await asyncio.sleep(0.5)  # a late duplicate, if any, would arrive now
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
        wire: dict[str, list[Frame]] = collections.defaultdict(list)
        spy = await driver.channel.declare_queue(exclusive=True, auto_delete=True)
        for t in codecs:
            await spy.bind(driver.exchanges["tensors"], driver.names.tensor_key("cdag", t))

        async def on_wire(message) -> None:
            frame = decode_frame(message.body)
            for name in frame.arrays:
                wire[name].append(frame)

        await spy.consume(on_wire, no_ack=True)
        try:
            results = await driver.run_many(xs, concurrency=4, prefix="c")
            # int8 at the fork (error <= scale / 2 per element) and float16 on a branch: close, not exact
            err = _check_outputs(results, ref, "c", 5e-2 * float(np.max(np.abs(ref))))
            assert err > 0
            await eventually(lambda: wire["stem:0"] and wire["branch_a:0"], timeout=10,
                             message="the spy queue saw both compressed cuts")
            stem, branch = wire["stem:0"][0], wire["branch_a:0"][0]
            stem_codec, stem_scale = stem.codecs["stem:0"]
            assert stem_codec == "int8" and stem.arrays["stem:0"].dtype == np.int8 and stem_scale > 0
            assert branch.codecs["branch_a:0"] == ("float16", None)
            assert branch.arrays["branch_a:0"].dtype == np.float16
            assert stem.arrays["stem:0"].nbytes * 4 == 1 * 16 * 16 * 8 * 4  # a quarter of the float32 bytes
            # the int8 stem without its scale: refused with a clear error, dead-lettered; the server goes on
            bad = encode_frame(TENSORS, {"rid": "c-noscale", "dep": "cdag", "rt": driver.id},
                               {"stem:0": np.zeros((1, 16, 16, 8), np.int8)}, codecs={"stem:0": ("int8", None)})
            await driver.publisher.publish("tensors", driver.names.tensor_key("cdag", "stem:0"), bad,
                                           headers={"request_id": "c-noscale"})
            again = await driver.run_many(xs[:3], concurrency=2, prefix="c2")
            assert set(again) == {"c20", "c21", "c22"}
            await eventually(lambda: len(driver.errors) >= 2, timeout=10, interval=0.1,
                             message=lambda: f"2 error results for c-noscale, got {driver.errors}")
            # one error from each part that takes the stem (both branches)
            assert sorted((e.job_id, e.code) for e in driver.errors) == [("c-noscale", "bad_codec")] * 2
            assert all("scale" in e.message for e in driver.errors)
            _no_duplicates(driver)
        finally:
            await driver.stop()

    asyncio.run(main())
    assert cluster.stop() == {"s": 0}
