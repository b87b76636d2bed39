"""A serving layer you can leave running, tried on a private RabbitMQ node of the test's own (never the shared one:
these tests restart it), with `splitinfer up` as a real supervisor process and the fork/join model (its outputs
differ per input, so every answer is checked against its own input's reference).

(1) a broker restart with 20 jobs waiting in the jobs queue (the front end frozen by SIGSTOP) loses none: each is
    answered once, with its own input's result; the same with quorum queues (SPLITINFER_QUEUE_TYPE=quorum);
(2) a job whose reply_to cannot be a routing key, and one whose id cannot, are answered with an error where they
    can be, never computed, and end in the dead-letter queue with their reason (`splitinfer dead` shows it);
(3) a job id submitted again gets its answer again;
(4) a second `splitinfer up` on a live namespace is refused with one line;
(5) after `up` restarts, a job on the existing deployment succeeds without a redeploy; `splitinfer down` refuses
    while `up` runs, and `down --purge` removes the namespace from the broker afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import uuid

import numpy as np
import psutil
import pytest

aio_pika = pytest.importorskip("aio_pika")

from splitinfer.actors.supervisor.broker import PrivateBroker, rabbitmq_installed  # noqa: E402
from splitinfer.actors.transport.topology import Names, QueuePolicy  # noqa: E402
from splitinfer.client import Client, subscribe_results  # noqa: E402
from splitinfer.messages import ErrorResult, InferenceJob, ResultMessage  # noqa: E402
from splitinfer.splitter.manifest import Manifest  # noqa: E402
from tests.support.actors import dag_reference, log_events  # noqa: E402
from tests.support.broker import free_port  # noqa: E402
from tests.support.cli import assert_one_line_error, cli  # noqa: E402
from tests.support.up_cluster import up_cluster  # noqa: E402
from tests.support.waiting import eventually  # noqa: E402

pytestmark = pytest.mark.skipif(not rabbitmq_installed(), reason="needs rabbitmq-server for a private node")

CONFIG = '[[servers]]\nid = "s1"\n\n[[servers]]\nid = "s2"\n'
TOL = 1e-5


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    node = PrivateBroker(free_port(), tmp_path_factory.mktemp("broker"), say=lambda m: None)
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, run_prefix, broker):
    with up_cluster(tmp_path_factory.mktemp("reliable"), run_prefix, CONFIG, tag="rel",
                    SPLITINFER_BROKER_URL=broker.url) as info:
        yield info


@pytest.fixture(scope="module")
def deployed(cluster, dag_split):
    async def go():
        async with Client(cluster.settings) as c:
            return await c.deploy(dag_split, min_servers=2, timeout=300)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def io_names(dag_split) -> tuple[str, str]:
    m = Manifest.load(dag_split)
    return m.inputs[0].name, m.output_names[0]


def _actor_process(cluster, module: str) -> psutil.Process:
    [proc] = [p for p in psutil.Process(cluster.up.pid).children(recursive=True)
              if f"splitinfer.actors.{module}" in " ".join(p.cmdline())]
    return proc


def _log(cluster, actor: str) -> list[dict]:
    return log_events(cluster.root / "cache" / "run" / cluster.ns / "logs" / f"{actor}.log")


def _assert_own_answers(answers: dict[str, ResultMessage | ErrorResult], xs: dict[str, np.ndarray], ref, out: str):
    """Each job's answer is the model's output for its own input: nearest to its reference, within TOL."""
    ids = list(xs)
    refs = np.asarray(ref)
    for k, job_id in enumerate(ids):
        a = answers[job_id]
        assert isinstance(a, ResultMessage), a
        y = a.outputs[out][0]
        assert float(np.max(np.abs(y - refs[k]))) <= TOL
        assert int(np.argmin(np.abs(refs - y).reshape(len(ids), -1).max(axis=1))) == k


def _restart_broker_with_jobs_queued(cluster, broker, deployment: str, io_names, dag_split, n: int = 20):
    """n jobs published while the front end is frozen, the broker restarted, the front end thawed: every job is
    answered once, with its own input's result."""
    inp, out = io_names
    xs, ref = dag_reference(dag_split, n, seed=11)
    ids = [f"restart-{uuid.uuid4().hex[:6]}-{i}" for i in range(n)]
    reply_to = f"restart-{uuid.uuid4().hex[:6]}"
    front_end = _actor_process(cluster, "front_end")

    async def publish_all():
        async with Client(cluster.settings) as c:
            for job_id, x in zip(ids, xs):
                await c.session.publisher.publish(
                    "", c.names.jobs, InferenceJob(job_id=job_id, deployment=deployment, inputs={inp: x[None]},
                                                   deadline_s=120, reply_to=reply_to))

    async def collect():
        seen: list = []
        ready = asyncio.Event()

        async def listen():
            async for msg in subscribe_results(reply_to, cluster.settings, ready=ready, dedupe=False):
                seen.append(msg)

        task = asyncio.create_task(listen())
        await asyncio.wait_for(ready.wait(), 30)
        front_end.send_signal(signal.SIGCONT)
        await eventually(lambda: len({m.job_id for m in seen}) >= n, timeout=120, interval=0.1,
                         message=lambda: f"{n} answers after the restart, got {len({m.job_id for m in seen})}")
        await asyncio.sleep(2.0)  # a second answer to any job would arrive now
        task.cancel()
        return seen

    front_end.send_signal(signal.SIGSTOP)  # the jobs wait in the queue (or unacked in the frozen front end's hands)
    try:
        asyncio.run(publish_all())
        broker.stop()
        broker.start()
        seen = asyncio.run(collect())
    finally:
        front_end.send_signal(signal.SIGCONT)
    counts = collections.Counter(m.job_id for m in seen)
    assert all(counts[j] == 1 for j in ids), {j: counts[j] for j in ids if counts[j] != 1}
    _assert_own_answers({m.job_id: m for m in seen}, dict(zip(ids, xs)), ref, out)


def test_broker_restart_with_jobs_queued_loses_none(cluster, deployed, broker, io_names, dag_split):
    _restart_broker_with_jobs_queued(cluster, broker, deployed.deployment, io_names, dag_split)


def test_quorum_queues_keep_jobs_across_a_broker_restart_too(tmp_path, run_prefix, broker, dag_split, io_names):
    """SPLITINFER_QUEUE_TYPE=quorum (what a broker cluster needs: replicated queues) on one node."""
    with up_cluster(tmp_path, run_prefix, CONFIG, tag="quorum", SPLITINFER_BROKER_URL=broker.url,
                    SPLITINFER_QUEUE_TYPE="quorum") as q:
        async def deploy_and_check():
            async with Client(q.settings) as c:
                dep = await c.deploy(dag_split, min_servers=2, timeout=300)
                # it really is a quorum queue: the same declaration as a classic one is refused
                classic = QueuePolicy.from_settings(q.settings.model_copy(update={"queue_type": "classic"}))
                async with c.session.connection.scratch_channel() as ch:
                    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                        await ch.declare_queue(c.names.jobs, durable=True, arguments=classic.arguments(c.names))
                return dep

        dep = asyncio.run(deploy_and_check())
        _restart_broker_with_jobs_queued(q, broker, dep.deployment, io_names, dag_split, n=10)


def test_unroutable_ids_are_refused_uncomputed_and_dead_lettered(cluster, deployed, io_names, dag_split):
    inp, _ = io_names
    xs, _ = dag_reference(dag_split, 2, seed=12)
    bad_reply = f"badrt-{uuid.uuid4().hex[:6]}"
    long_id = "a." * 95 + uuid.uuid4().hex[:6]          # 196 characters, over 255 bytes once its dots are escaped
    answer_key = f"longid-{uuid.uuid4().hex[:6]}"

    async def go():
        got: dict[str, ErrorResult] = {}
        ready = [asyncio.Event(), asyncio.Event()]

        async def listen(key, ev):
            async for msg in subscribe_results(key, cluster.settings, ready=ev):
                got[key] = msg

        tasks = [asyncio.create_task(listen(bad_reply, ready[0])), asyncio.create_task(listen(answer_key, ready[1]))]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 30)
        async with Client(cluster.settings) as c:
            # the answer of a job whose reply_to cannot route goes to its id's key instead
            await c.session.publisher.publish("", c.names.jobs, InferenceJob(
                job_id=bad_reply, deployment=deployed.deployment, inputs={inp: xs[:1]}, reply_to="r" * 300))
            await c.session.publisher.publish("", c.names.jobs, InferenceJob(
                job_id=long_id, deployment=deployed.deployment, inputs={inp: xs[1:]}, reply_to=answer_key))
            await eventually(lambda: len(got) == 2, timeout=60, interval=0.1, message=lambda: f"answers: {got}")
        for t in tasks:
            t.cancel()
        return got

    got = asyncio.run(go())
    assert got[bad_reply].code == "bad_reply_to" and "routing key" in got[bad_reply].message
    assert got[answer_key].code == "bad_job_id" and got[answer_key].job_id == long_id
    sent = {e.get("job_id") for e in _log(cluster, "front_end") if e.get("event") == "job_sent"}
    assert bad_reply not in sent and long_id not in sent, "a refused job was computed"
    shown = cli("dead", "--show", "100", "--json", env=cluster.env)
    assert shown.returncode == 0, shown.stderr
    letters = json.loads(shown.stdout)["letters"]
    by_code = {d["code"]: d for d in letters}
    assert {"bad_reply_to", "bad_job_id"} <= set(by_code), letters
    assert "routing key" in by_code["bad_reply_to"]["reason"] and by_code["bad_reply_to"]["actor"] == "front_end"
    assert by_code["bad_reply_to"]["routing_key"] == Names(cluster.ns).jobs
    total = json.loads(shown.stdout)["count"]
    # sent back where they were going, they are refused again (and dead-lettered again, with the same reason)
    requeued = cli("dead", "--requeue", env=cluster.env)
    assert requeued.returncode == 0 and f"sent {total} dead letter" in requeued.stdout, requeued.stdout

    seen: list = []

    async def refused_again() -> bool:
        async with Client(cluster.settings) as c:
            count, now = await c.dead_letters(100)
            seen[:] = [count, sorted((d.code, d.actor) for d in now)]
            return count == total and {d.code for d in now} >= {"bad_reply_to", "bad_job_id"}

    asyncio.run(eventually(refused_again, timeout=60, interval=0.3,
                           message=lambda: f"the requeued jobs refused again; before: {letters}, now: {seen}"))
    purged = cli("dead", "--purge", env=cluster.env)
    assert purged.returncode == 0 and f"deleted {total} dead letter" in purged.stdout, purged.stdout
    assert json.loads(cli("dead", "--json", env=cluster.env).stdout)["count"] == 0


def test_resubmitted_job_id_gets_its_answer(cluster, deployed, io_names, dag_split):
    inp, out = io_names
    xs, ref = dag_reference(dag_split, 1, seed=13)
    job = InferenceJob(job_id=f"again-{uuid.uuid4().hex[:6]}", deployment=deployed.deployment, inputs={inp: xs},
                       deadline_s=60)

    async def go():
        async with Client(cluster.settings) as first:
            a = await first.wait(await first.submit_job(job), timeout=90)
        async with Client(cluster.settings) as second:  # another caller, after a timeout of its own
            b = await second.wait(await second.submit_job(job), timeout=90)
        return a, b

    a, b = asyncio.run(go())
    for answer in (a, b):
        assert isinstance(answer, ResultMessage), answer
        assert answer.job_id == job.job_id
        assert float(np.max(np.abs(answer.outputs[out] - ref))) <= TOL
    again = [e for e in _log(cluster, "front_end") if e.get("event") == "job_answered_again"]
    assert any(e["job_id"] == job.job_id for e in again)


def test_second_up_on_a_live_namespace_is_refused(cluster):
    proc = cli("up", "--config", str(cluster.root / "cluster.toml"), env=cluster.env, timeout=120)
    assert_one_line_error(proc, "already has a running control plane")
    assert cluster.up.poll() is None  # the first one carries on


def test_deployments_survive_a_restart_of_up_and_down_cleans_up(tmp_path, run_prefix, broker, dag_split, io_names):
    inp, out = io_names
    xs, ref = dag_reference(dag_split, 2, seed=14)
    env = {"SPLITINFER_BROKER_URL": broker.url}
    with up_cluster(tmp_path, run_prefix, CONFIG, tag="again", **env) as first:
        async def deploy():
            async with Client(first.settings) as c:
                dep = await c.deploy(dag_split, min_servers=2, timeout=300)
                return dep, await c.infer(dep.deployment, xs[:1], deadline_s=60)

        dep, before = asyncio.run(deploy())
    assert float(np.max(np.abs(before.outputs[out] - ref[:1]))) <= TOL
    with up_cluster(tmp_path, run_prefix, CONFIG, ns=first.ns, **env) as again:
        async def infer():
            async with Client(again.settings) as c:
                async def restored() -> bool:  # what `splitinfer status` shows: every part loaded again
                    hosted = {p.part for a in await c.servers() for p in a.parts if p.deployment == dep.deployment}
                    return hosted == set(dep.placement)

                await eventually(restored, timeout=120, interval=0.2, message="the servers restored their parts")
                return await c.infer(dep.deployment, xs[1:], deadline_s=90)

        after = asyncio.run(infer())  # no deploy: the restarted servers loaded their parts again
        assert float(np.max(np.abs(after.outputs[out] - ref[1:]))) <= TOL
        refused = cli("down", env=again.env)
        assert_one_line_error(refused, "still runs namespace")
    removed = cli("down", "--purge", env=again.env)
    assert removed.returncode == 0, removed.stderr

    async def jobs_queue_gone() -> bool:
        conn = await aio_pika.connect(broker.url)
        async with conn:
            ch = await conn.channel()
            try:
                await ch.declare_queue(Names(first.ns).jobs, passive=True)
                return False
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return True

    assert asyncio.run(jobs_queue_gone()), removed.stdout
