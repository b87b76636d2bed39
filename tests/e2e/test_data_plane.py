"""The data plane in real processes on the real broker: consecutive parts hosted by one server hand their tensors
over in-process (no broker hop: a spy on the broker sees nothing of them), and under concurrency requests of one
part run as batches whose outputs equal the unbatched model's, each answer its own input's."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

aio_pika = pytest.importorskip("aio_pika")

from tests.support.actors import Driver  # noqa: E402
from tests.support.actors import core_settings as _settings  # noqa: E402
from tests.support.actors import reference  # noqa: E402
from tests.support.broker import requires_broker  # noqa: E402
from tests.support.waiting import eventually  # noqa: E402

pytestmark = requires_broker

CUTS = ["c1", "c2"]  # the chain's cut points: 3 parts


def chain_model():
    from splitinfer import _tf  # noqa: F401
    import keras
    from keras import layers

    keras.utils.set_random_seed(3)
    x = inp = keras.Input((12, 12, 3), name="img")
    for name in ("c0", "c1", "c2", "c3"):
        x = layers.Conv2D(6, 3, padding="same", activation="tanh", name=name)(x)
    out = layers.Dense(5, name="head")(layers.Flatten(name="flat")(x))
    return keras.Model(inp, out, name="chain")


@pytest.fixture(scope="module")
def chain_split(tmp_path_factory):
    from splitinfer.splitter import ModelGraph, save_split, split_at_cuts

    out = tmp_path_factory.mktemp("chain") / "split"
    graph = ModelGraph(chain_model())
    save_split(graph, split_at_cuts(graph, [f"{c}:0" for c in CUTS]), out, origin="test:chain")
    return out


async def _spy(driver: Driver, deployment: str, tensors: list[str]) -> list:
    """Everything published to `<ns>.tensors` under these tensors' keys, as it happens."""
    seen: list = []
    q = await driver.channel.declare_queue(exclusive=True, auto_delete=True)
    for t in tensors:
        await q.bind(driver.exchanges["tensors"], driver.names.tensor_key(deployment, t))
    await q.consume(lambda m: seen.append(m.routing_key), no_ack=True)
    return seen


def test_consecutive_parts_in_one_process_make_no_broker_hop(chain_split, cluster_factory, namespace):
    from splitinfer.splitter.manifest import Manifest

    manifest = Manifest.load(chain_split)
    cut_tensors = [o.name for p in manifest.parts[:-1] for o in p.outputs]
    assert cut_tensors == ["c1:0", "c2:0"]
    cluster = cluster_factory()
    cluster.deployment_parts = ("chain", [("part0", 1), ("part1", 1), ("part2", 1)])
    # all three on one server; and a second deployment of the same split over two servers, as a control that the
    # spy does see a hop that crosses processes
    cluster.start("one", "model_server", "--id", "one", "--split-dir", str(chain_split), "--deployment", "chain",
                  "--part", "part0,part1,part2")
    cluster.start("a", "model_server", "--id", "a", "--split-dir", str(chain_split), "--deployment", "split2",
                  "--part", "part0,part1")
    cluster.start("b", "model_server", "--id", "b", "--split-dir", str(chain_split), "--deployment", "split2",
                  "--part", "part2")
    xs = np.random.default_rng(0).uniform(-1, 1, size=(12, 12, 12, 3)).astype(np.float32)
    ref = reference(chain_split, xs)
    cluster.wait_for("one", "part_loaded", 3)
    cluster.wait_for("a", "part_loaded", 2)
    cluster.wait_for("b", "part_loaded", 1)

    async def main() -> None:
        driver = Driver(_settings(namespace), "chain", manifest)
        other = Driver(_settings(namespace), "split2", manifest)
        await driver.start()
        await other.start()
        try:
            local_spy = await _spy(driver, "chain", cut_tensors)
            crossing_spy = await _spy(driver, "split2", cut_tensors)
            got = await driver.run_many(xs, concurrency=4, prefix="co")
            got2 = await other.run_many(xs, concurrency=4, prefix="x")
            for i in range(len(xs)):  # each answer is its own input's
                assert np.allclose(got[f"co{i}"], ref[i:i + 1], atol=1e-5)
                assert np.allclose(got2[f"x{i}"], ref[i:i + 1], atol=1e-5)
            # the control: on two servers, part1's output crossed the broker once per request
            await eventually(lambda: len(crossing_spy) >= len(xs), timeout=10,
                             message=lambda: f"the spy saw {len(crossing_spy)} crossing tensors")
            assert set(crossing_spy) == {driver.names.tensor_key("split2", "c2:0")}
            await asyncio.sleep(0.5)  # a stray publish of the co-located cuts, if any, would arrive by now
            assert local_spy == [], local_spy
            for i in range(len(xs)):
                hops = driver.hops[f"co{i}"]
                assert [(h[0], h[1], h[8]) for h in hops] == [("part0", "one", "broker"), ("part1", "one", "local"),
                                                             ("part2", "one", "local")]
                assert hops[1][2] == 0.0 and hops[2][2] == 0.0  # no transfer time: nothing travelled
        finally:
            await other.stop()
            await driver.stop()

    asyncio.run(main())
    assert cluster.stop() == {"one": 0, "a": 0, "b": 0}


def test_batches_form_under_concurrency_and_match_unbatched_outputs(chain_split, cluster_factory, namespace):
    from splitinfer.splitter.manifest import Manifest

    manifest = Manifest.load(chain_split)
    # a part waits up to 50 ms for more requests to join its batch (Triton's max queue delay), at most 6 a batch
    cluster = cluster_factory(SPLITINFER_BATCH_DELAY_US=50_000, SPLITINFER_MAX_BATCH=6)
    cluster.deployment_parts = ("chain", [("part0", 1), ("part1", 1), ("part2", 1)])
    for i in range(3):
        cluster.start(f"s{i}", "model_server", "--id", f"s{i}", "--split-dir", str(chain_split), "--deployment",
                      "chain", "--part", f"part{i}")
    xs = np.random.default_rng(1).uniform(-1, 1, size=(36, 12, 12, 3)).astype(np.float32)
    ref = reference(chain_split, xs)  # the whole model, 25 inputs a call at most
    unbatched = np.concatenate([reference(chain_split, xs[i:i + 1]) for i in range(len(xs))])
    for i in range(3):
        cluster.wait_for(f"s{i}", "part_loaded")

    async def main() -> None:
        driver = Driver(_settings(namespace), "chain", manifest)
        await driver.start()
        try:
            got = await driver.run_many(xs, concurrency=12, prefix="b")
            sizes = [h[6] for rid in got for h in driver.hops[rid]]
            assert max(sizes) > 1, sizes          # batches formed
            assert max(sizes) <= 6, sizes         # and stayed within the bound
            for i in range(len(xs)):             # the same numbers as one request a call, each its own input's
                assert np.allclose(got[f"b{i}"], unbatched[i:i + 1], atol=1e-5)
                assert np.allclose(got[f"b{i}"], ref[i:i + 1], atol=1e-5)
        finally:
            await driver.stop()

    asyncio.run(main())
    assert cluster.stop() == {"s0": 0, "s1": 0, "s2": 0}
