"""The runtime as a user runs it: `splitinfer up` (a real supervisor process) starts registry, model pool, result
store, front end and three model servers on the real broker, in a namespace of this test module; the Client deploys
a 3-part MobileNetV3Small split onto them and sends jobs through the jobs queue and the real front end.

(1) 24 jobs (Client and plain publish_job), all within 1e-5 of the local model, each answered exactly once on the
    results exchange and stored once in the result store, visible through `splitinfer results`.
(2) a job past its deadline, an unknown deployment, wrong shape, wrong dtype, wrong input name and undecodable
    bytes each get one clear error result (and are dead-lettered); the front end keeps serving.
(3) `splitinfer infer`, `status`, `results` against the cluster; CLI errors are one line with a non-zero exit.
(4) kill -9 the front end with 8 jobs in flight: the supervisor restarts it and every job gets its correct result
    (the broker redelivers the unacked jobs; the new front end runs them under fresh request ids).
(5) kill -9 the only server of a part: the supervisor restarts it and orders it to load that part again; jobs sent
    meanwhile wait in the part's queue and all complete correctly.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

aio_pika = pytest.importorskip("aio_pika")
psutil = pytest.importorskip("psutil")

from splitinfer.actors.result_store.store import ResultStore  # noqa: E402
from splitinfer.actors.transport.topology import Names  # noqa: E402
from splitinfer.client import Client, ClientError, publish_job, subscribe_results  # noqa: E402
from splitinfer.messages import ErrorResult, InferenceJob, ResultMessage  # noqa: E402
from tests.support.actors import log_events  # noqa: E402
from tests.support.broker import requires_broker  # noqa: E402
from tests.support.cli import assert_one_line_error, cli, cli_many  # noqa: E402
from tests.support.up_cluster import up_cluster  # noqa: E402
from tests.support.waiting import eventually, eventually_sync  # noqa: E402

pytestmark = requires_broker

MODEL = "keras.applications:MobileNetV3Small"
INPUT = "input_layer:0"
TOL = 1e-5


# ------------------------------------------------------------------------------------------------------ fixtures

# Where `splitinfer split MobileNetV3Small --parts 3` cuts (balanced by FLOPs); fixed here so the fixture skips the
# FLOP profiling and builds the split in-process (tensor names are stable across processes).
CUTS = [["expanded_conv_3_squeeze_excite_mul:0"], ["expanded_conv_8_expand:0"]]


@pytest.fixture(scope="module")
def small_split(tmp_path_factory) -> Path:
    from splitinfer import _tf  # noqa: F401
    from splitinfer.splitter import ModelGraph, save_split, split_at_cuts

    out = tmp_path_factory.mktemp("e2e_split") / "small3"
    # logits (no softmax): with random weights the softmax says ~1/1000 for every class and every input, which
    # cannot tell one input's answer from another's
    import keras

    from splitinfer.splitter.build import fresh_auto_names

    with fresh_auto_names():  # its input is `input_layer` whatever the test process built before
        model = keras.applications.MobileNetV3Small(weights=None, classifier_activation=None,
                                                    input_shape=(224, 224, 3))
    graph = ModelGraph(model)
    save_split(graph, split_at_cuts(graph, CUTS), out, origin=f"{MODEL} (logits)")
    return out


@pytest.fixture(scope="module")
def reference(small_split):
    """The unsplit model, compiled, as the judge of every distributed answer."""
    from splitinfer import _tf  # noqa: F401
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(small_split / "source.keras", safe_mode=True, compile=False)
    fn = tf.function(lambda x: model(x, training=False))
    return lambda x: np.asarray(fn(x))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, run_prefix):
    config = ('[[servers]]\nid = "phone"\nsite = "device"\n\n'
              '[[servers]]\nid = "edgebox"\nsite = "edge"\n\n'
              '[[servers]]\nid = "cloud"\nsite = "cloud"\n')
    with up_cluster(tmp_path_factory.mktemp("cluster"), run_prefix, config, tag="e2e") as info:
        yield info


@pytest.fixture(scope="module")
def deployed(cluster, small_split):
    async def go():
        async with Client(cluster.settings) as c:
            return await c.deploy(small_split, min_servers=3, timeout=300)

    dep = asyncio.run(go())
    assert sorted(s for servers in dep.placement.values() for s in servers) == ["cloud", "edgebox", "phone"]
    return dep


def _inputs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, size=(1, 224, 224, 3)).astype(np.float32) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------- tests

def test_jobs_are_correct_answered_once_and_stored(cluster, deployed, reference):
    n_client, n_plain = 20, 4
    xs = _inputs(n_client + n_plain, seed=1)

    async def go():
        seen: list = []
        ready = asyncio.Event()

        async def listen():
            async for msg in subscribe_results("#", cluster.settings, ready=ready):
                seen.append(msg)

        listener = asyncio.create_task(listen())
        await asyncio.wait_for(ready.wait(), 30)
        async with Client(cluster.settings) as c:
            sem = asyncio.Semaphore(6)

            async def one(x):
                async with sem:
                    return await c.infer(deployed.deployment, x, deadline_s=60)

            results = await asyncio.gather(*(one(x) for x in xs[:n_client]))
            # plain helper: a job published without the Client; its answer goes to key = job id
            plain_ids = [await publish_job(InferenceJob(deployment=deployed.deployment, inputs={INPUT: x},
                                                        deadline_s=60), cluster.settings)
                         for x in xs[n_client:]]
            await eventually(lambda: len({m.job_id for m in seen}) >= n_client + n_plain, timeout=60, interval=0.1,
                             message=lambda: f"{n_client + n_plain} answers on the results exchange, saw {len(seen)}")
            await asyncio.sleep(1.5)  # a duplicate answer, if any, would arrive now
        listener.cancel()
        return results, plain_ids, seen

    results, plain_ids, seen = asyncio.run(go())
    by_job = collections.Counter(m.job_id for m in seen)
    ids = [r.job_id for r in results] + plain_ids
    assert len(set(ids)) == len(ids)
    assert all(by_job[j] == 1 for j in ids), {j: by_job[j] for j in ids if by_job[j] != 1}
    answers = {m.job_id: m for m in seen}
    refs = [reference(x).astype(np.float64) for x in xs]
    for k, job_id in enumerate(ids):
        msg = answers[job_id]
        assert isinstance(msg, ResultMessage), msg
        got = msg.outputs["predictions:0"].astype(np.float64)
        errs = [float(np.max(np.abs(got - r))) for r in refs]
        assert errs[k] <= TOL, (job_id, errs[k])
        assert int(np.argmin(errs)) == k, f"job {job_id} got another input's answer"
    # per-hop timings say where the time went: three parts on three servers and the answer's trip back; through
    # the Client the front end is not on the way: parts + 1 broker hops
    r0 = results[0]
    assert [h.part for h in r0.hops] == ["part0", "part1", "part2", "answer"]
    assert all(h.via == "broker" for h in r0.hops) and "front_end" not in {h.server for h in r0.hops}
    parts = [(h.part, h.server) for h in r0.hops if h.part.startswith("part")]
    assert [p for p, _ in parts] == ["part0", "part1", "part2"]
    assert len({s for _, s in parts}) == 3
    assert all(h.compute_s > 0 for h in r0.hops if h.part.startswith("part"))
    assert r0.latency_s and r0.latency_s > sum(h.compute_s for h in r0.hops)

    # the result store kept each job once (it acks after the commit: poll briefly)
    with ResultStore(cluster.store_url) as db:
        def stored() -> list:
            rows = [r for r in db.query(cluster.ns) if r.job_id in set(ids)]
            assert len(rows) >= len(ids), f"{len(rows)} of {len(ids)} jobs stored"
            return rows

        rows = eventually_sync(stored, timeout=20, interval=0.2, message="every job in the result store")
        counts = collections.Counter(r.job_id for r in rows)
        assert all(counts[j] == 1 for j in ids), counts
        assert all(r.kind == "result" and r.deployment == deployed.deployment for r in rows)
        assert rows[0].outputs == {"predictions:0": {"shape": [1, 1000], "dtype": "<f4"}}

    proc = cli("results", "--namespace", cluster.ns, "--store", cluster.store_url, "--limit", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert {r["job_id"] for r in listed} >= set(ids)
    proc = cli("results", "--namespace", cluster.ns, "--store", cluster.store_url, "--job", ids[0])
    assert proc.returncode == 0 and ids[0] in proc.stdout and "part0@" in proc.stdout, proc.stdout


def test_bad_jobs_get_clear_errors_and_the_front_end_keeps_serving(cluster, deployed, reference):
    x = _inputs(1, seed=2)[0]

    async def go():
        async with Client(cluster.settings) as c:
            async def answer(fut):
                return await c.wait(fut, timeout=60)

            def job(deployment, inputs):  # through the jobs queue: the front end validates it
                return InferenceJob(deployment=deployment, inputs=inputs, reply_to=c.id)

            bad = {"unknown": ("no-such-deployment", {INPUT: x}), "shape": (deployed.deployment, {INPUT: x[:, :100]}),
                   "dtype": (deployed.deployment, {INPUT: x.astype(np.float64)}),
                   "name": (deployed.deployment, {"bogus:0": x})}
            out = {
                "late": await answer(await c.submit(deployed.deployment, x, deadline_s=0.001)),
                **{key: await answer(await c.submit_job(job(*args))) for key, args in bad.items()},
                "bytes": await answer(await c.submit_job(b"\xc1 not msgpack", job_id="raw-" + uuid.uuid4().hex)),
            }
            # the Client itself refuses the same inputs at once, in one line, before sending anything
            for key, (deployment, inputs) in bad.items():
                with pytest.raises(ClientError) as refused:
                    await c.submit(deployment, inputs)
                assert "\n" not in str(refused.value) and str(refused.value), key
            good = await c.infer(deployed.deployment, x, deadline_s=60)
            # the same job id twice: one answer
            twice = InferenceJob(deployment=deployed.deployment, inputs={INPUT: x}, deadline_s=60, reply_to=c.id)
            await c.submit_job(twice)
            dup = await answer(await c.submit_job(twice))
            dead = (await c.queue_depths([Names(cluster.ns).dead]))[Names(cluster.ns).dead]
            return out, good, dead, dup

    out, good, dead, dup = asyncio.run(go())
    assert isinstance(dup, ResultMessage)
    expect = {"late": ("deadline_exceeded", "deadline"), "unknown": ("unknown_deployment", "no-such-deployment"),
              "shape": ("wrong_shape", "(1, 100, 224, 3)"), "dtype": ("wrong_dtype", "float64"),
              "name": ("bad_inputs", "bogus:0"), "bytes": ("bad_message", "msgpack")}
    for key, (code, needle) in expect.items():
        err = out[key]
        assert isinstance(err, ErrorResult), (key, err)
        assert err.code == code and needle in err.message, (key, err)
        assert err.where == "front_end"
    # the front end still serves, correctly
    assert float(np.max(np.abs(good.outputs["predictions:0"] - reference(x)))) <= TOL
    # the five malformed jobs went to the dead-letter queue (the late one was answered and acked)
    assert dead is not None and dead >= 5
    with ResultStore(cluster.store_url) as db:
        time.sleep(1.5)  # a second answer to the job sent twice, if any, would be stored by now

        def errors_stored() -> dict:
            stored = {r.job_id: r for r in db.query(cluster.ns, kind="error")}
            assert all(out[k].job_id in stored for k in out), sorted(stored)
            return stored

        stored = eventually_sync(errors_stored, timeout=20, interval=0.2, message="every error in the result store")
        assert len(db.query(cluster.ns, job_id=dup.job_id)) == 1
    assert all(out[k].job_id in stored for k in out)


def test_cli_infer_status_results_and_one_line_errors(cluster, deployed, reference, small_split, tmp_path):
    x = _inputs(1, seed=3)[0]
    np.save(tmp_path / "x.npy", x)
    env = cluster.env
    dep = deployed.deployment
    (tmp_path / "bad.npy").write_bytes(b"not an npy file")
    (tmp_path / "bad.toml").write_text('[[servers]]\nid = "a"\n[[servers]]\nid = "a"\n')
    np.save(tmp_path / "small.npy", x[:, :50])
    ok = [
        ("deploy", str(small_split), "--json"),  # again: idempotent, same round-robin placement
        ("infer", "--deployment", dep, "--input", str(tmp_path / "x.npy"), "--json"),
        ("infer", "--deployment", dep, "--input", str(tmp_path / "x.npy")),
        ("status", "--json"),
        ("status",),
        ("results", "--limit", "3"),
    ]
    # user errors: one line on stderr, non-zero exit, no traceback
    bad = [
        (("infer", "--deployment", "nope", "--input", str(tmp_path / "x.npy")), "no deployment 'nope'"),
        (("infer", "--deployment", dep, "--input", str(tmp_path / "missing.npy")), "input file not found"),
        (("infer", "--deployment", dep, "--input", str(tmp_path / "bad.npy")), "cannot read"),
        (("infer", "--deployment", dep, "--input", str(tmp_path / "small.npy")), "wrong_shape"),
        (("deploy", str(tmp_path / "nowhere")), "not a split directory"),
        (("deploy", str(small_split), "--placement", "part0"), "--placement item"),
        (("deploy", str(small_split), "--replicas", "4"), "4 replicas per part need 4 live servers; 3 are live"),
        (("deploy", str(small_split), "--placement", "part0=phone,part1=edgebox,part2=gone"), "not live"),
        (("results", "--kind", "bogus"), "--kind"),
        (("results", "--store", "mysql://db/x"), "not supported"),
        (("up", "--config", str(tmp_path / "missing.toml")), "not found"),
        (("up", "--config", str(tmp_path / "bad.toml")), "appears twice"),
        (("status", "--namespace", f"{cluster.ns}.empty"), "registry did not answer"),
        (("status", "--broker-url", "amqp://guest:guest@localhost:1/"), "no broker answers at amqp://localhost:1/"),
    ]
    # every CLI process pays the package's import time: run them side by side
    procs = cli_many(ok + [c for c, _ in bad], env=env, parallel=4)
    deploy_json, infer_json, infer_table, status_json, status_table, results_table = procs[:len(ok)]
    for (args, needle), proc in zip(bad, procs[len(ok):]):
        assert_one_line_error(proc, needle)

    assert deploy_json.returncode == 0, deploy_json.stderr
    assert json.loads(deploy_json.stdout)["placement"] == deployed.placement
    assert infer_json.returncode == 0, infer_json.stderr
    report = json.loads(infer_json.stdout)
    got = np.asarray(report["outputs"]["predictions:0"]["values"], dtype=np.float32)
    assert float(np.max(np.abs(got - reference(x)))) <= TOL
    assert [h["part"] for h in report["hops"]] == ["part0", "part1", "part2", "answer"]
    assert infer_table.returncode == 0, infer_table.stderr
    assert "compute ms" in infer_table.stdout and "predictions:0" in infer_table.stdout, infer_table.stdout

    assert status_json.returncode == 0, status_json.stderr
    st = json.loads(status_json.stdout)
    servers = {a["actor_id"]: a for a in st["actors"] if a["kind"] == "model_server"}
    assert set(servers) == {"phone", "edgebox", "cloud"} and all(a["alive"] for a in servers.values())
    # each server measured this machine's speed at start (once per machine, cached) and reports it, with the
    # part runtimes it can load
    assert all(a["state"]["speed_gflops"] and a["state"]["speed_gflops"] > 0 for a in servers.values()), servers
    assert all("onnxruntime" in a["state"]["runtimes"] for a in servers.values())
    assert {a["kind"] for a in st["actors"]} >= {"registry", "model_pool", "front_end", "result_store"}
    assert set(st["deployments"][dep]) == {"part0", "part1", "part2"}
    assert Names(cluster.ns).jobs in st["queues"]
    assert status_table.returncode == 0, status_table.stderr
    assert "edgebox" in status_table.stdout and "queue depths" in status_table.stdout, status_table.stdout
    assert results_table.returncode == 0 and "result" in results_table.stdout, results_table.stdout


def test_a_job_through_the_client_does_not_pass_through_the_front_end(cluster, deployed, reference):
    """With the front end frozen (SIGSTOP), jobs through the Client still run: their inputs go straight to the
    first part and their answers straight back (parts + 1 hops); a job through the jobs queue waits for it."""
    [front] = [p for p in psutil.Process(cluster.up.pid).children(recursive=True)
               if "splitinfer.actors.front_end" in " ".join(p.cmdline())]
    xs = _inputs(4, seed=9)

    async def go():
        async with Client(cluster.settings) as c:
            await c.infer(deployed.deployment, xs[0], deadline_s=60)  # the client knows the deployment
            front.send_signal(signal.SIGSTOP)
            try:
                queued = await c.submit_job(InferenceJob(deployment=deployed.deployment, inputs={INPUT: xs[0]},
                                                         deadline_s=60, reply_to=c.id))
                direct = await asyncio.wait_for(
                    asyncio.gather(*(c.infer(deployed.deployment, x, deadline_s=60) for x in xs)), 30)
                assert not queued.done()  # the jobs queue's job waits for the frozen front end
            finally:
                front.send_signal(signal.SIGCONT)
            return direct, await c.wait(queued, timeout=60)

    direct, queued = asyncio.run(go())
    for x, r in zip(xs, direct):
        assert [h.part for h in r.hops] == ["part0", "part1", "part2", "answer"]
        assert float(np.max(np.abs(r.outputs["predictions:0"] - reference(x)))) <= TOL
    assert isinstance(queued, ResultMessage) and [h.part for h in queued.hops][0] == "job"


def test_kill_9_of_the_front_end_with_jobs_in_flight_loses_none_and_the_supervisor_restarts_it(
        cluster, deployed, reference):
    def front_ends():
        return [p for p in psutil.Process(cluster.up.pid).children(recursive=True)
                if "splitinfer.actors.front_end" in " ".join(p.cmdline())]

    [victim] = front_ends()
    xs = _inputs(8, seed=4)

    async def go():
        async with Client(cluster.settings) as c:
            futs = [await c.submit(deployed.deployment, x, deadline_s=90) for x in xs]
            victim.send_signal(signal.SIGKILL)  # some jobs are queued, some in the front end's hands
            return await asyncio.gather(*(c.wait(f, timeout=150) for f in futs))

    answers = asyncio.run(go())
    victim.wait(10)
    assert not victim.is_running()
    # through the Client the answers do not wait for the front end (it is off the tensor path): they may all be in
    # before the supervisor's restart of it, so wait for that
    eventually_sync(lambda: [p for p in front_ends() if p.pid != victim.pid], timeout=30, interval=0.2,
                    message="the supervisor restarted the front end")
    text = cluster.log.read_text()
    assert "front_end" in text and "restarting in" in text
    for x, a in zip(xs, answers):
        assert isinstance(a, ResultMessage), a
        assert float(np.max(np.abs(a.outputs["predictions:0"] - reference(x)))) <= TOL


def test_kill_9_of_a_model_server_restarts_it_with_its_part_and_queued_jobs_complete(cluster, deployed, reference):
    [server] = deployed.placement["part1"]
    [victim] = [p for p in psutil.Process(cluster.up.pid).children(recursive=True)
                if "splitinfer.actors.model_server" in " ".join(p.cmdline()) and f"--id {server} " in
                " ".join(p.cmdline()) + " "]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    xs = _inputs(4, seed=5)

    async def go():
        async with Client(cluster.settings) as c:
            futs = [await c.submit(deployed.deployment, x, deadline_s=120) for x in xs]
            return await asyncio.gather(*(c.wait(f, timeout=150) for f in futs))

    answers = asyncio.run(go())
    for x, a in zip(xs, answers):
        assert isinstance(a, ResultMessage), a
        assert float(np.max(np.abs(a.outputs["predictions:0"] - reference(x)))) <= TOL
        assert any(h.part == "part1" and h.server == server for h in a.hops)
    server_log = cluster.root / "cache" / "run" / cluster.ns / "logs" / f"server-{server}.log"
    restored = [e for e in log_events(server_log) if e.get("event") == "parts_restored"]
    assert restored and any(p.endswith("/part1@r0/1") for p in restored[-1]["parts"]), restored
    assert not restored[-1]["failed"]
