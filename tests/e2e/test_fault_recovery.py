"""Faults injected into a running pipeline of real actor processes on the real broker:

(1) kill -9 one join replica while requests are in flight: every request completes, none lost, none answered twice;
    the registry calls it dead, the replica comes back and gets its queue back, SIGTERM hands its work back.
(2) the broker closes a server's connection: it reconnects and serves on, each request computed once per part.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess

import pytest

aio_pika = pytest.importorskip("aio_pika")

from splitinfer.actors.registry.client import RegistryClient  # noqa: E402
from tests.support.actors import Driver  # noqa: E402
from tests.support.actors import check_outputs as _check_outputs  # noqa: E402
from tests.support.actors import core_settings as _settings  # noqa: E402
from tests.support.actors import dag_reference as _dag_reference  # noqa: E402
from tests.support.actors import no_duplicates as _no_duplicates  # noqa: E402
from tests.support.broker import requires_broker  # noqa: E402
from tests.support.waiting import eventually  # noqa: E402

pytestmark = requires_broker


# ---------------------------------------------------------------------------------------------- (1)

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
            await asyncio.sleep(1.0)  # late deliveries (duplicates, an error) would arrive now, to be counted below
            assert killed_at, "the replica was never killed"
            _check_outputs(results, ref, "k", 1e-5)
            _no_duplicates(driver)
            assert not driver.errors, driver.errors[:3]
            dups = sum(n - 1 for n in driver.received.values())
            print(f"\nkilled j0 after {killed_at[0]} answers; {dups} duplicate final deliveries (first wins)")
            assert cluster.procs["j0"].wait(5) == -signal.SIGKILL
            # the registry notices: no heartbeat from j0 within the liveness timeout (3 s here)
            registry = RegistryClient(driver.rpc)

            async def j0_called_dead() -> dict[str, bool]:
                hosts = await registry.who_hosts(deployment="dag", part="part3", include_dead=True)
                alive = {a.actor_id: a.alive for a in hosts}
                assert alive.get("j0") is False, alive
                return alive

            alive = await eventually(j0_called_dead, timeout=15, interval=0.5, message="the registry calls j0 dead")
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


# ---------------------------------------------------------------------------------------------- (2)

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
