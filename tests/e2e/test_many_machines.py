"""Several machines, as far as one can tell them apart on one: a control plane started with `splitinfer up
--control-plane`, and model servers started with `splitinfer server`, each with its own HOME, cache and working
directory and nothing but the broker URL and the namespace in its environment (they share no file with the control
plane: parts come through the model pool). Deploy, infer (each answer its own input's), kill -9 one server: its
supervisor restarts it, it rejoins with its parts, and jobs are answered again; a second server of the same name is
refused. The results go to PostgreSQL, and `splitinfer results --store postgresql://...` reads them from a machine
that has nothing of the cluster's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest

from splitinfer.actors.transport import Names
from splitinfer.client import Client, ClientError
from splitinfer.messages import ErrorResult, InferenceJob, ResultMessage
from splitinfer.splitter.manifest import Manifest
from tests.support.actors import dag_reference
from tests.support.broker import BROKER, requires_broker
from tests.support.cli import assert_one_line_error, cli
from tests.support.postgres import requires_postgres, scratch_database
from tests.support.up_cluster import up_cluster
from tests.support.waiting import eventually

pytestmark = [requires_broker, requires_postgres]

TOL = 1e-5
CONTROL_PLANE = "front_end = true\n"  # no [[servers]]: they join from their own machines


SKEWED_CLOCK = """import time as _t
_real = _t.time
_t.time = lambda: _real() + {offset!r}   # this "machine's" wall clock is off; its monotonic clock is not
"""


@contextlib.contextmanager
def remote_server(root: Path, ns: str, name: str, site: str, clock_offset_s: float = 0.0):
    """`splitinfer server` as on a machine of its own: a fresh HOME and working directory, the broker URL and the
    namespace's settings (the test's namespaces expire: a server declaring its queues otherwise is refused);
    `clock_offset_s`: its wall clock that far off (a sitecustomize module shifts time.time)."""
    home = root / name
    home.mkdir(parents=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "SPLITINFER_BROKER_URL": BROKER,
           "SPLITINFER_NAMESPACE": ns, "SPLITINFER_HEARTBEAT_INTERVAL_S": "0.5",
           "SPLITINFER_LIVENESS_TIMEOUT_S": "3", "SPLITINFER_QUEUE_EXPIRES_S": "600"}
    if clock_offset_s:
        (home / "skew").mkdir()
        (home / "skew" / "sitecustomize.py").write_text(SKEWED_CLOCK.format(offset=clock_offset_s))
        env["PYTHONPATH"] = str(home / "skew")
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "splitinfer.cli", "server", "--name", name, "--site", site],
                            env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        yield proc, env, home
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _exists(queue: str, exchange: str) -> tuple[bool, bool]:
    """Whether a queue and an exchange exist on the broker (passive declares, each on a channel of its own)."""
    import aio_pika

    async def check() -> tuple[bool, bool]:
        conn = await aio_pika.connect(BROKER)
        async with conn:
            out = []
            for declare in (lambda ch: ch.declare_queue(queue, passive=True),
                            lambda ch: ch.declare_exchange(exchange, passive=True)):
                try:
                    await declare(await conn.channel())
                    out.append(True)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    out.append(False)
            return out[0], out[1]

    return asyncio.run(check())


def _server_process(supervisor: subprocess.Popen) -> psutil.Process:
    [proc] = [p for p in psutil.Process(supervisor.pid).children(recursive=True)
              if "splitinfer.actors.model_server" in " ".join(p.cmdline())]
    return proc


@pytest.fixture
def results_db():
    with scratch_database("machines") as url:
        yield url


def test_servers_join_from_their_own_machines_and_rejoin_after_a_crash(tmp_path, run_prefix, dag_split, results_db):
    m = Manifest.load(dag_split)
    out = m.output_names[0]
    xs, ref = dag_reference(dag_split, 3, seed=31)
    env = {"SPLITINFER_HEARTBEAT_INTERVAL_S": "0.5", "SPLITINFER_LIVENESS_TIMEOUT_S": "3"}
    with up_cluster(tmp_path / "control", run_prefix, CONTROL_PLANE, tag="machines", store_url=results_db,
                    **env) as cp:
        with remote_server(tmp_path / "machines", cp.ns, "e1", "edge") as (e1, e1_env, e1_home), \
                remote_server(tmp_path / "machines", cp.ns, "c1", "cloud") as (c1, _, c1_home):
            async def deploy_and_infer():
                async with Client(cp.settings) as c:
                    async def joined() -> bool:
                        try:
                            return {a.actor_id for a in await c.servers()} == {"e1", "c1"}
                        except ClientError:  # the control plane is still starting
                            return False

                    await eventually(joined, timeout=180, interval=0.3, message="both servers registered")
                    dep = await c.deploy(dag_split, min_servers=2, timeout=300)
                    return dep, await c.infer(dep.deployment, xs[:1], deadline_s=60)

            dep, first = asyncio.run(deploy_and_infer())
            assert isinstance(first, ResultMessage) and float(np.max(np.abs(first.outputs[out] - ref[:1]))) <= TOL
            # each server fetched what it hosts into its own cache, through the broker
            for home in (e1_home, c1_home):
                assert any((home / ".cache" / "splitinfer").rglob("*.keras")), home

            # a second server of the same name, from anywhere, is refused in one line
            again = subprocess.run([sys.executable, "-m", "splitinfer.cli", "server", "--name", "e1"],
                                   env={**e1_env, "COLUMNS": "200"}, cwd=e1_home, capture_output=True, text=True,
                                   timeout=120)
            assert_one_line_error(again, "server 'e1' already runs")

            victim = _server_process(e1)
            victim.kill()
            victim.wait(timeout=30)

            async def after_the_crash():
                async with Client(cp.settings) as c:
                    async def rejoined() -> bool:
                        return any(a.actor_id == "e1" and a.alive and
                                   {p.deployment for p in a.parts} == {dep.deployment} for a in await c.servers())

                    await eventually(rejoined, timeout=180, interval=0.3, message="e1 back with its parts")
                    return [await c.infer(dep.deployment, xs[k:k + 1], deadline_s=60) for k in (1, 2)]

            answers = asyncio.run(after_the_crash())
            assert _server_process(e1).pid != victim.pid
            for k, a in zip((1, 2), answers):
                assert isinstance(a, ResultMessage), a
                assert float(np.max(np.abs(a.outputs[out] - ref[k:k + 1]))) <= TOL
            assert e1.poll() is None and c1.poll() is None
            # the answers, read from a machine with nothing of the cluster's: only the database URL
            elsewhere = tmp_path / "laptop"
            elsewhere.mkdir()
            shown = cli("results", "--store", results_db, "--namespace", cp.ns, "--json",
                        env={"PATH": os.environ.get("PATH", ""), "HOME": str(elsewhere)})
            assert shown.returncode == 0, shown.stderr
            rows = [json.loads(line) for line in shown.stdout.splitlines()]
            assert sorted(r["kind"] for r in rows) == ["result"] * 3, rows
            assert {r["deployment"] for r in rows} == {dep.deployment}
        assert e1.returncode == 0 and c1.returncode == 0, (e1_home / "server.log").read_text()[-2000:]
    # and `down --purge` from a machine without rabbitmqctl removes every part queue and exchange too
    names = Names(cp.ns)
    parts = [(names.replica_queue(dep.deployment, part, 0), names.part_exchange(dep.deployment, part))
             for part in dep.placement]
    assert all(_exists(q, ex) == (True, True) for q, ex in parts)
    no_ctl = ":".join(p for p in os.environ.get("PATH", "").split(":") if p and not Path(p, "rabbitmqctl").exists())
    down = cli("down", "--purge", "--namespace", cp.ns, env={"PATH": no_ctl, "HOME": str(elsewhere),
                                                             "SPLITINFER_BROKER_URL": BROKER})
    assert down.returncode == 0, down.stderr
    assert all(_exists(q, ex) == (False, False) for q, ex in parts), down.stdout


def test_clocks_that_disagree_neither_expire_nor_extend_a_job(tmp_path, run_prefix, dag_split, results_db,
                                                              monkeypatch):
    """Servers whose wall clocks are an hour ahead and an hour behind, and a client an hour behind the front end:
    jobs on both paths (straight to the parts, and through the jobs queue) are answered, each hop's transfer time
    stays within the job's budget, and a job that cannot finish is still answered deadline_exceeded."""
    import time as time_mod

    m = Manifest.load(dag_split)
    inp, out = m.inputs[0].name, m.output_names[0]
    xs, ref = dag_reference(dag_split, 2, seed=33)
    env = {"SPLITINFER_HEARTBEAT_INTERVAL_S": "0.5", "SPLITINFER_LIVENESS_TIMEOUT_S": "3"}
    with up_cluster(tmp_path / "control", run_prefix, CONTROL_PLANE, tag="skew", store_url=results_db, **env) as cp, \
            remote_server(tmp_path / "machines", cp.ns, "ahead", "edge", clock_offset_s=3600.0), \
            remote_server(tmp_path / "machines", cp.ns, "behind", "cloud", clock_offset_s=-3600.0):
        async def deploy():
            async with Client(cp.settings) as c:
                async def joined() -> bool:
                    try:
                        return {a.actor_id for a in await c.servers()} == {"ahead", "behind"}
                    except ClientError:
                        return False

                await eventually(joined, timeout=180, interval=0.3, message="both servers registered")
                return await c.deploy(dag_split, min_servers=2, timeout=300)

        dep = asyncio.run(deploy())
        real = time_mod.time
        monkeypatch.setattr(time_mod, "time", lambda: real() - 3600.0)  # this client's clock: an hour behind

        async def infer():
            async with Client(cp.settings) as c:
                await eventually(lambda: c._front_clock_offset_s is not None, timeout=30, interval=0.1,
                                 message="the client heard the front end's heartbeat")
                direct = await c.infer(dep.deployment, xs[:1], deadline_s=30)
                queued = await c.wait(await c.submit_job(InferenceJob(
                    job_id=f"skew-{uuid.uuid4().hex[:6]}", deployment=dep.deployment, inputs={inp: xs[1:]},
                    deadline_s=30, submitted_at=time_mod.time())), timeout=60)  # stamped by this clock
                hopeless = await c.wait(await c.submit_job(InferenceJob(
                    job_id=f"late-{uuid.uuid4().hex[:6]}", deployment=dep.deployment, inputs={inp: xs[1:]},
                    deadline_s=0.001, submitted_at=time_mod.time())), timeout=60)
                return direct, queued, hopeless

        direct, queued, hopeless = asyncio.run(infer())
    for k, a in enumerate((direct, queued)):
        assert isinstance(a, ResultMessage), a
        assert float(np.max(np.abs(a.outputs[out] - ref[k:k + 1]))) <= TOL
        assert all(0.0 <= h.transfer_s <= 30.0 for h in a.hops), a.hops
    assert isinstance(hopeless, ErrorResult) and hopeless.code == "deadline_exceeded", hopeless
