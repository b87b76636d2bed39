"""The optimizer as a user runs it, on the real broker with real processes (`splitinfer up`): a phone-class device
(slowed, on battery), an edge box and a cloud server on emulated links.

(1) deploy MobileNetV3Small (96x96) through the optimizer: a plan table whose every plan is a deployment the
    servers serve;
(2) per-job plan choice: a loose budget on a full battery gets the fastest plan, a tight budget on a low battery
    the least-energy plan; results say which plan ran, are correct, and the result store keeps the plan;
(3) a server of the chosen plan stops answering: the front end falls back to a plan without it;
(4) an SLA no plan meets, a server that is not registered, and a server that fails to load a part: clear errors,
    nothing half deployed;
(5) undeploy removes every plan.
"""

from __future__ import annotations

import asyncio
import signal

import numpy as np
import pytest

psutil = pytest.importorskip("psutil")

from splitinfer.actors.actor import Actor  # noqa: E402
from splitinfer.client import Client, ClientError  # noqa: E402
from splitinfer.actors.result_store.store import ResultStore  # noqa: E402
from splitinfer.actors.transport.topology import declare_control_queue  # noqa: E402
from splitinfer.messages import LoadPart, Reply, ServerState, UnloadPart  # noqa: E402
from tests.support.broker import requires_broker  # noqa: E402
from tests.support.up_cluster import up_cluster  # noqa: E402
from tests.support.waiting import eventually, eventually_sync  # noqa: E402

pytestmark = requires_broker

MODEL = "keras.applications:MobileNetV3Small"
SHAPE = (96, 96, 3)
NAME = "mnv3s"
TOL = 1e-5

# Offloading saves the device energy (its compute draws 5 W, its radio 0.5 W) but costs time (it is 3x slower than
# this machine, the edge 1.5x, and every hop off the device pays an RTT): fastest and least-energy plans differ.
CONFIG = """
front_end_site = "device"
emulate_links = true
[[servers]]
id = "phone"
site = "device"
slowdown = 3.0
power = {compute_w = 5.0, radio_w = 0.5, idle_w = 0.1}
[[servers]]
id = "edge1"
site = "edge"
slowdown = 1.5
[[servers]]
id = "cloud1"
site = "cloud"
[links]
device-edge = {rtt_ms = 8, bandwidth_mbps = 100}
edge-cloud = {rtt_ms = 10, bandwidth_mbps = 1000}
device-cloud = {rtt_ms = 18, bandwidth_mbps = 100}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, run_prefix):
    # plans re-predicted from live state would move the figures under the test's feet: once an hour here
    with up_cluster(tmp_path_factory.mktemp("opt"), run_prefix, CONFIG, tag="opt",
                    SPLITINFER_REPLAN_INTERVAL_S="3600") as info:
        yield info


@pytest.fixture(scope="module")
def reference():
    from splitinfer import _tf  # noqa: F401
    import tensorflow as tf

    from splitinfer.splitter import load_source_model

    model = load_source_model(MODEL, SHAPE)
    fn = tf.function(lambda x: model(x, training=False))
    return lambda x: np.asarray(fn(x))


def run(coro):
    return asyncio.run(coro)


async def _client(cluster, servers: int = 3) -> Client:
    c = Client(cluster.settings)
    await c.start()
    await c.wait_for_servers(servers, timeout=120)
    return c


@pytest.fixture(scope="module")
def deployed(cluster):
    async def go():
        c = await _client(cluster)
        try:
            return await c.deploy_model(MODEL, NAME, objective="latency", input_shape=list(SHAPE), timeout=600)
        finally:
            await c.stop()

    return run(go())


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, size=(1, *SHAPE)).astype(np.float32)


def test_deploy_gives_a_plan_table_whose_every_plan_serves(cluster, deployed):
    table = deployed["table"]
    assert deployed["name"] == NAME and table["objective"] == "latency" and table["client"] == "phone"
    plans = {p["id"]: p for p in table["plans"]}
    assert len(plans) >= 2, table
    assert plans[table["primary"]]["latency"] == min(p["latency"] for p in plans.values())
    assert set(deployed["deployments"]) == set(plans)

    async def go():
        c = await _client(cluster)
        try:
            listed = await c.deployments()
            hosted = {}
            for pid, dep in deployed["deployments"].items():
                hosts = await c.registry.who_hosts(deployment=dep)
                hosted[pid] = sorted((ref.part, a.actor_id) for a in hosts for ref in a.parts
                                     if ref.deployment == dep)
            return listed, await c.models(), hosted
        finally:
            await c.stop()

    listed, models, hosted = run(go())
    assert NAME in models
    for pid, plan in plans.items():
        assert deployed["deployments"][pid] in listed
        want = sorted((f"part{i}", part["server"]) for i, part in enumerate(plan["parts"]))
        assert hosted[pid] == want, (pid, hosted[pid], want)


def test_each_job_gets_the_plan_its_budget_and_battery_call_for(cluster, deployed, reference):
    plans = deployed["table"]["plans"]
    fastest = min(plans, key=lambda p: (p["latency"], p["energy"]))
    frugal = min(plans, key=lambda p: (p["energy"], p["latency"]))
    assert fastest["id"] != frugal["id"], f"the cluster should make offloading frugal but slow: {plans}"
    x = _x(1)

    async def go():
        c = await _client(cluster)
        try:
            loose = await c.infer(NAME, x, max_latency_s=10.0, battery=1.0, deadline_s=60)
            tight = await c.infer(NAME, x, max_latency_s=frugal["latency"] * 1.05, battery=0.1, deadline_s=60)
            with pytest.raises(Exception) as impossible:
                await c.infer(NAME, x, max_latency_s=1e-5, deadline_s=60)
            return loose, tight, impossible.value
        finally:
            await c.stop()

    loose, tight, impossible = run(go())
    assert (loose.plan, tight.plan) == (fastest["id"], frugal["id"])
    assert loose.plan_deployment == deployed["deployments"][fastest["id"]]
    assert set(tight.served_by) == {p["server"] for p in frugal["parts"]}
    want = reference(x)
    for r in (loose, tight):
        (out,) = r.outputs.values()
        assert float(np.max(np.abs(out - want))) <= TOL
    assert "no_plan" in str(impossible) and "unreachable" in str(impossible)
    store = ResultStore(cluster.store_url)

    def both_stored() -> list:
        rows = [r for job in (loose.job_id, tight.job_id) for r in store.query(cluster.ns, job_id=job)]
        assert len(rows) >= 2, rows
        return rows

    rows = eventually_sync(both_stored, timeout=20, interval=0.2, message="both jobs in the result store")
    assert sorted(r.plan for r in rows) == sorted([fastest["id"], frugal["id"]])


def test_a_server_that_stops_answering_is_avoided(cluster, deployed, reference):
    plans = deployed["table"]["plans"]
    frugal = min(plans, key=lambda p: (p["energy"], p["latency"]))
    remote = sorted({p["server"] for p in frugal["parts"]} - {"phone"})
    assert remote, frugal
    victim = remote[0]
    proc = next(k for k in psutil.Process(cluster.up.pid).children(recursive=True)
                if "--id" in k.cmdline() and k.cmdline()[k.cmdline().index("--id") + 1] == victim)
    x = _x(2)
    proc.send_signal(signal.SIGSTOP)  # no heartbeats from now on; its queues stay (a frozen box, not a dead one)
    try:
        async def go():
            c = await _client(cluster, servers=2)
            try:
                # the registry's liveness timeout is at least the front end's, on the same heartbeats: once the
                # registry calls the frozen server dead (or has forgotten it), the front end calls it down too
                async def called_dead() -> bool:
                    hosts = await c.registry.who_hosts(include_dead=True)
                    return not any(a.actor_id == victim and a.alive for a in hosts)

                await eventually(called_dead, timeout=60, interval=0.2, message=f"the registry calls {victim} dead")
                return await c.infer(NAME, x, max_latency_s=10.0, battery=0.1, deadline_s=60)
            finally:
                await c.stop()

        r = run(go())
    finally:
        proc.send_signal(signal.SIGCONT)
    chosen = next(p for p in plans if p["id"] == r.plan)
    assert victim not in {p["server"] for p in chosen["parts"]} and victim not in r.served_by
    (out,) = r.outputs.values()
    assert float(np.max(np.abs(out - reference(x)))) <= TOL


class FaultyServer(Actor):
    """A model server that registers and heartbeats like one but fails every load order (a full disk, say)."""

    kind = "model_server"

    def __init__(self, settings):
        super().__init__("faulty", settings, site="cloud")
        self.orders: list[str] = []

    async def setup(self) -> None:
        q = await declare_control_queue(self.channel, self.names, f"{self.names.ns}.server.{self.id}",
                                        [self.names.load_key(self.id), self.names.unload_key(self.id)],
                                        self.connection.policy)

        async def on(message):
            msg = self.decode(message, expect=(LoadPart, UnloadPart))
            await self.deliveries.ack(message)
            self.orders.append(f"{msg.TYPE} {msg.deployment}/{msg.part}")
            ok = isinstance(msg, UnloadPart)
            await self.rpc.reply(message, Reply(ok=ok, message="unloaded" if ok else "no space left on device"))

        await self.consume(q, on)

    async def heartbeat_state(self) -> ServerState:
        return ServerState(site=self.site, slowdown=1.0)


def test_deploy_errors_leave_nothing_half_deployed(cluster, deployed):
    async def go():
        c = await _client(cluster)
        faulty = FaultyServer(cluster.settings)
        await faulty.start()
        try:
            before = (sorted(await c.deployments()), sorted(await c.models()))
            errors = {}
            for label, kw in {
                "sla": dict(sla_s=1e-5),
                "ghost": dict(servers=["phone", "ghost"]),
                "faulty": dict(servers=["faulty"], client_site="cloud"),
            }.items():
                await asyncio.sleep(0)
                with pytest.raises(ClientError) as err:
                    await c.deploy_model(MODEL, f"bad-{label}", input_shape=list(SHAPE), timeout=300, **kw)
                errors[label] = str(err.value)
            after = (sorted(await c.deployments()), sorted(await c.models()))
            hosts = await c.registry.who_hosts()
            hosted = [ref.deployment for a in hosts for ref in a.parts if ref.deployment.startswith("bad-")]
            return before, after, errors, hosted, list(faulty.orders)
        finally:
            await faulty.stop()
            await c.stop()

    before, after, errors, hosted, orders = run(go())
    assert "no plan meets the SLA" in errors["sla"] and "best achievable" in errors["sla"]
    assert "'ghost' is not registered" in errors["ghost"]
    assert "did not load on faulty" in errors["faulty"] and "no space left" in errors["faulty"]
    assert after == before and hosted == []
    loads = [o for o in orders if o.startswith("load_part")]
    assert loads and all(o.split(" ")[1].startswith("bad-faulty:") for o in orders)


def test_undeploy_removes_every_plan(cluster, deployed):
    async def go():
        c = await _client(cluster)
        try:
            message = await c.undeploy(NAME)

            left: list[str] = []

            async def none_left() -> bool:  # servers tell the registry as they drop their parts
                hosts = await c.registry.who_hosts()
                left[:] = [ref.deployment for a in hosts for ref in a.parts if ref.deployment.startswith(f"{NAME}:")]
                return not left

            await eventually(none_left, timeout=10, interval=0.2, message=lambda: f"plans still hosted: {left}")
            with pytest.raises(ClientError, match="no deployment"):
                await c.infer(NAME, _x(3), deadline_s=30)
            return message, left, await c.deployments(), await c.models()
        finally:
            await c.stop()

    message, left, deployments, models = run(go())
    assert "undeployed" in message and left == []
    assert NAME not in models and not [d for d in deployments if d.startswith(f"{NAME}:")]
