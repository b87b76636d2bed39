"""A Client job whose inputs are lost on the way (here: one of a part's two inputs never reaches the broker) is
sent again as soon as the front end hears of it from the part's join timeout, and answered once, exactly; without
that word the Client would wait for a share of the deadline (minutes here) before sending it again."""

from __future__ import annotations

import asyncio
import collections

import numpy as np

from splitinfer.client import Client, subscribe_results
from splitinfer.messages import ResultMessage

from tests.support.up_cluster import up_cluster

CONFIG = '[[servers]]\nid = "s1"\n'
DEADLINE_S = 600.0  # the Client's own timer would send the job again after half of this
TOL = 1e-5


def two_input_split(out):
    """One part with two inputs: it runs once both have arrived (the server's join)."""
    from splitinfer import _tf  # noqa: F401
    import keras
    from keras import layers

    from splitinfer.splitter import ModelGraph, save_split, split_by_groups

    keras.utils.set_random_seed(5)
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    y = layers.Dense(4, name="head")(layers.Add(name="sum")([layers.Dense(8, name="da")(a), b]))
    model = keras.Model([a, b], y, name="twoin")
    graph = ModelGraph(model)
    manifest = save_split(graph, split_by_groups(graph, {n: 0 for n in graph.compute_nodes}), out, origin="test:twoin")
    assert len(manifest.parts) == 1 and len(manifest.parts[0].inputs) == 2
    return model, manifest


def test_a_client_job_whose_input_was_lost_goes_again_when_the_front_end_says_so(tmp_path, run_prefix):
    model, manifest = two_input_split(tmp_path / "split")
    names = [t.name for t in manifest.inputs]
    rng = np.random.default_rng(3)
    xs = {n: rng.normal(size=(1, 8)).astype(np.float32) for n in names}
    want = np.asarray(model([xs[n] for n in names]))
    with up_cluster(tmp_path / "run", run_prefix, CONFIG, tag="lost", SPLITINFER_JOIN_TIMEOUT_S="1") as up:
        async def go():
            wire: collections.Counter = collections.Counter()
            ready = asyncio.Event()

            async def listen():  # every answer on the results exchange, as they come
                async for msg in subscribe_results("#", up.settings, ready=ready, dedupe=False):
                    wire[msg.job_id] += 1

            listener = asyncio.create_task(listen())
            await asyncio.wait_for(ready.wait(), 30)
            async with Client(up.settings) as c:
                dep = await c.deploy(tmp_path / "split", timeout=300)
                publish, dropped = c.session.publisher.publish, []

                async def drop_one_input(exchange, key, body, **kw):
                    if exchange == "tensors" and not dropped and key.endswith(names[1]):
                        dropped.append(key)  # the first attempt's second input never leaves
                        return None
                    return await publish(exchange, key, body, **kw)

                c.session.publisher.publish = drop_one_input
                answer = await c.wait(await c.submit(dep.deployment, xs, deadline_s=DEADLINE_S, job_id="lost-1"),
                                      timeout=120)
                second = await c.wait(await c.submit(dep.deployment, xs, deadline_s=DEADLINE_S, job_id="fine-2"),
                                      timeout=120)
                await asyncio.sleep(1.0)  # a second answer to the first job would be on the wire by now
            listener.cancel()
            return answer, second, dropped, wire

        answer, second, dropped, wire = asyncio.run(go())
    assert dropped, "the test dropped no input"
    for a in (answer, second):
        assert isinstance(a, ResultMessage), a
        got = next(iter(a.outputs.values()))
        assert float(np.max(np.abs(got - want))) <= TOL
    assert wire["lost-1"] == 1 and wire["fine-2"] == 1, wire  # the front end's word to the Client is no answer
