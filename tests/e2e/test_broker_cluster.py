"""The same system on a three-node RabbitMQ cluster (private nodes of the test's own: own names, ports, data
directories, the consistent-hash plugin on each), jobs and control in quorum queues, every actor given every node's
URL: stopping the node everyone connected to first, under load, loses no job and answers none twice; the actors
carry on through the survivors, and a job sent afterwards is answered."""

from __future__ import annotations

import asyncio
import collections
import uuid

import numpy as np
import pytest

from splitinfer.actors.supervisor.broker import PrivateCluster, rabbitmq_installed
from splitinfer.actors.transport import masked
from splitinfer.client import Client, subscribe_results
from splitinfer.messages import ResultMessage
from splitinfer.splitter.manifest import Manifest
from tests.support.actors import dag_reference, log_events
from tests.support.broker import free_port
from tests.support.up_cluster import up_cluster
from tests.support.waiting import eventually

pytestmark = pytest.mark.skipif(not rabbitmq_installed(), reason="needs rabbitmq-server for private nodes")

CONFIG = '[[servers]]\nid = "s1"\n\n[[servers]]\nid = "s2"\n'
TOL = 1e-5


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    cluster = PrivateCluster([free_port() for _ in range(3)], tmp_path_factory.mktemp("nodes"), say=lambda m: None)
    cluster.start()
    yield cluster
    cluster.stop()


# Opt-in (--runslow) until the Client learns of lost inputs. It failed in 3 of 5 full runs on this 2-core machine:
# once a job answered twice (fixed: the answering part answers a job once), twice a Client job whose tensors went
# down with the node after the Client had reconnected (it re-sends only what it sent before its own loss): answered
# once with the join's timeout, once by its deadline.
@pytest.mark.slow
def test_a_node_down_under_load_loses_no_job(tmp_path, run_prefix, nodes, dag_split):
    m = Manifest.load(dag_split)
    inp, out = m.inputs[0].name, m.output_names[0]
    n, stop_after = 40, 12
    xs, ref = dag_reference(dag_split, n + 1, seed=21)
    with up_cluster(tmp_path, run_prefix, CONFIG, tag="nodes", SPLITINFER_BROKER_URL=nodes.url,
                    SPLITINFER_QUEUE_TYPE="quorum") as up:
        async def go():
            wire: collections.Counter = collections.Counter()
            ready = asyncio.Event()

            async def listen():  # every answer on the wire, not deduplicated: a second one would show here
                async for msg in subscribe_results("#", up.settings, ready=ready, dedupe=False):
                    wire[msg.job_id] += 1

            listener = asyncio.create_task(listen())
            await asyncio.wait_for(ready.wait(), 30)
            async with Client(up.settings) as c:
                dep = await c.deploy(dag_split, min_servers=2, timeout=300)
                ids = [f"node-{uuid.uuid4().hex[:6]}-{i}" for i in range(n)]
                futures, stopped = [], None
                for i, job_id in enumerate(ids):
                    if i == stop_after:  # the first node: every actor connected there first
                        stopped = asyncio.create_task(asyncio.to_thread(nodes.nodes[0].stop))
                    futures.append(await c.submit(dep.deployment, {inp: xs[i:i + 1]}, deadline_s=120,
                                                  job_id=job_id))
                    await asyncio.sleep(0.1)
                answers = [await c.wait(f, timeout=150) for f in futures]
                await stopped
                after = await c.infer(dep.deployment, xs[n:], deadline_s=60)  # through the survivors only
                await eventually(lambda: all(wire[j] >= 1 for j in ids), timeout=30, interval=0.1,
                                 message="every answer seen on the wire")
                await asyncio.sleep(2.0)  # a second answer to any job would arrive now
            listener.cancel()
            return ids, answers, after, wire

        ids, answers, after, wire = asyncio.run(go())
    for k, (job_id, a) in enumerate(zip(ids, answers)):
        assert isinstance(a, ResultMessage), a
        assert a.job_id == job_id
        y = a.outputs[out][0]
        assert float(np.max(np.abs(y - ref[k]))) <= TOL
        assert int(np.argmin(np.abs(ref - y).reshape(len(ref), -1).max(axis=1))) == k  # its own input's answer
    assert {j: wire[j] for j in ids if wire[j] != 1} == {}, "jobs answered twice"
    assert isinstance(after, ResultMessage) and float(np.max(np.abs(after.outputs[out] - ref[n:]))) <= TOL
    first = masked(nodes.nodes[0].url)
    for actor in ("front_end", "registry", "server-s1", "server-s2"):  # they all carried on through another node
        events = log_events(up.root / "cache" / "run" / up.ns / "logs" / f"{actor}.log")
        assert [e["node"] for e in events if e.get("event") == "started"][:1] == [first], actor
        moved = [e["node"] for e in events if e.get("event") == "reconnected"]
        assert moved and moved[-1] != first and moved[-1] in nodes.url.replace("guest:guest@", ""), (actor, moved)
