"""A model server against bad input, in real processes on the real broker: a malformed message, a wrong-shaped
tensor, an oversized tensor and a join input whose partner never comes each get a clear ErrorResult and land in
`<ns>.dead`; a request sent twice is answered once; partial joins beyond the prefetch do not stall; the server
keeps serving."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

aio_pika = pytest.importorskip("aio_pika")

from splitinfer.messages.frames import TENSORS, encode_frame  # noqa: E402
from tests.support.actors import Driver  # noqa: E402
from tests.support.actors import check_outputs as _check_outputs  # noqa: E402
from tests.support.actors import core_settings as _settings  # noqa: E402
from tests.support.actors import dag_reference as _dag_reference  # noqa: E402
from tests.support.broker import requires_broker  # noqa: E402
from tests.support.waiting import eventually  # noqa: E402

pytestmark = requires_broker


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
            # malformed: not a tensor frame at all
            await driver.publisher.publish("tensors", key, b"\xc1\xff not a frame",
                                           headers={"request_id": "bad-malformed"})
            # wrong shape: a valid message whose tensor is 8x8 instead of 16x16
            await driver.send("bad-shape", {"img:0": np.zeros((1, 8, 8, 3), np.float32)})
            # oversized: a 16x160x160x3 float32 tensor (4.9 MB) against a 200 kB limit
            await driver.send("bad-big", {"img:0": np.zeros((16, 160, 160, 3), np.float32)})
            # a join input whose partner never comes: join timeout (2 s here)
            await driver.publisher.publish(
                "tensors", names.tensor_key("dag", "branch_a:0"),
                encode_frame(TENSORS, {"rid": "bad-lonely", "dep": "dag", "rt": driver.id},
                             {"branch_a:0": np.zeros((1, 16, 16, 8), np.float32)}),
                headers={"request_id": "bad-lonely"})
            after = await driver.run_many(xs[10:], concurrency=4, prefix="ok2")  # still serving
            # 48 requests' first join inputs before any second one: more partial joins than the prefetch (32);
            # the join consumer's own prefetch leaves room for the inputs that complete them (no stall)
            loop = asyncio.get_running_loop()
            waits = {f"pre{i}": loop.create_future() for i in range(48)}
            driver.waiters.update(waits)
            for tensor in ("branch_a:0", "branch_b:0"):
                for rid in waits:
                    await driver.publisher.publish(
                        "tensors", names.tensor_key("dag", tensor),
                        encode_frame(TENSORS, {"rid": rid, "dep": "dag", "rt": driver.id},
                                     {tensor: np.ones((1, 16, 16, 8), np.float32)}),
                        headers={"request_id": rid})
            done = await asyncio.wait_for(asyncio.gather(*waits.values()), 20)
            assert len(done) == 48 and all(np.allclose(d["head:0"], done[0]["head:0"]) for d in done)
            await eventually(lambda: len(driver.errors) >= 4, timeout=10, interval=0.1,
                             message=lambda: f"4 error results, got {driver.errors}")
            by_job = {e.job_id: e for e in driver.errors}
            assert set(by_job) == {"bad-malformed", "bad-shape", "bad-big", "bad-lonely"}, driver.errors
            assert by_job["bad-malformed"].code == "bad_frame"
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
