"""Run-time re-planning on the real broker with real processes (`splitinfer up`): a slowed device and a cloud
server on an emulated link whose bandwidth the test changes while the cluster runs.

The model takes a 192 KiB image that three layers shrink 24x (the first alone makes 2 MiB of it), then does the
heavy work; the device is 100x slower than the cloud. On a fast link the best plan sends the image to the cloud
(the first layers cost the device more than the image costs the link, even measured at a fraction of its
bandwidth); on a 2 Mbit/s link it starts on the device. Deployed with one plan (the fast link's), then:
(1) the link narrows: the network monitors measure it, the optimizer plans again, deploys a plan that cuts on the
    device (logged with its before/after predictions), and jobs run on it, within 1e-5 of the local model;
(2) the front end reports the answers' hop timings; the optimizer learns server compute factors and the hop
    overhead from them and logs each plan's measured latency beside its predictions before and after learning;
(3) the plan nobody gets any more leaves the table and, after the job deadline, its servers;
(4) the link widens again: the cloud plan comes back (a new plan id; ids are never reused), and jobs run on it.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from splitinfer.client import Client
from splitinfer.monitor.links import MBIT
from tests.support.actors import log_events
from tests.support.broker import requires_broker
from tests.support.up_cluster import up_cluster
from tests.support.waiting import eventually

pytestmark = requires_broker

NAME = "shrink"
SHAPE = (128, 128, 3)
TOL = 1e-5
FAST = 1000.0  # Mbit/s
SLOW = 2.0

CONFIG = f"""
front_end_site = "device"
emulate_links = true
[[servers]]
id = "phone"
site = "device"
slowdown = 100.0
[[servers]]
id = "cloud1"
site = "cloud"
[links]
device-cloud = {{rtt_ms = 5, bandwidth_mbps = {FAST}}}
"""


def _model():
    from splitinfer import _tf  # noqa: F401
    import keras
    from keras import layers

    keras.utils.set_random_seed(11)
    inp = keras.Input(SHAPE, name="img")                                   # 192 KiB
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="stem")(inp)   # 28 MFLOP, 2 MiB out
    x = layers.Conv2D(8, 3, strides=4, padding="same", name="reduce")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)                           # 16x16x8 float32 = 8 KiB
    for i in range(4):
        x = layers.Conv2D(256, 3, padding="same", activation="relu", name=f"heavy{i}")(x)
    out = layers.Dense(10, name="head")(layers.GlobalAveragePooling2D(name="gap")(x))
    return keras.Model(inp, out, name="shrink")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("replan") / "shrink.keras"
    model = _model()
    model.save(path)
    return path, model


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, run_prefix):
    with up_cluster(tmp_path_factory.mktemp("replan_up"), run_prefix, CONFIG, tag="replan",
                    SPLITINFER_REPLAN_INTERVAL_S="1", SPLITINFER_REPLAN_HOLD="2", SPLITINFER_REPLAN_COOLDOWN_S="1",
                    SPLITINFER_REPLAN_RETIRE_AFTER_S="2", SPLITINFER_JOB_DEADLINE_S="4",
                    SPLITINFER_PROBE_INTERVAL_S="1", SPLITINFER_PROBE_BYTES=str(64 * 1024),
                    SPLITINFER_HOP_REPORT_INTERVAL_S="1") as info:
        yield info


def _events(cluster, kind: str) -> list[dict]:
    logs = cluster.root / "cache" / "run" / cluster.ns / "logs"
    return [e for e in log_events(logs / "optimizer.log") if e.get("event") == kind]


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, size=(1, *SHAPE)).astype(np.float32)


def _first_server(table: dict, plan_id: str) -> str:
    plan = next(p for p in table["plans"] if p["id"] == plan_id)
    return plan["parts"][0]["server"]


def test_the_plan_follows_the_link(cluster, model_file):
    path, model = model_file

    async def jobs_on(c: Client, n: int) -> list:
        out = []
        for i in range(n):
            x = _x(i)
            r = await c.infer(NAME, x, deadline_s=30)
            got = next(iter(r.outputs.values()))
            np.testing.assert_allclose(got, np.asarray(model(x)), atol=TOL)
            out.append(r.plan)
        return out

    async def primary(c: Client) -> tuple[dict, str]:
        table = await c.plan_table(NAME)
        return table, table["primary"]

    async def go():
        async with Client(cluster.settings) as c:
            await c.wait_for_servers(2, timeout=120)
            reply = await c.deploy_model(path, NAME, max_plans=1, timeout=600)
            first = reply["table"]["primary"]
            assert _first_server(reply["table"], first) == "cloud1", reply["table"]
            assert set(await jobs_on(c, 3)) == {first}

            # (1) the link narrows: a plan that starts on the device is deployed and jobs switch to it
            await c.set_links({"device-cloud": (0.005, SLOW * MBIT)})

            async def moved():
                table, pid = await primary(c)
                return (table, pid) if pid != first and _first_server(table, pid) == "phone" else None

            table, on_slow = await eventually(moved, timeout=120, interval=0.5,
                                              message=lambda: f"a device-first plan; optimizer said "
                                                              f"{_events(cluster, 'replanned')}")
            assert on_slow.startswith("r")
            change = next(e for e in _events(cluster, "replanned") if e["plan"] == on_slow)
            assert change["after_latency_ms"] < change["before_latency_ms"] * 0.85, change
            assert change["before_plan"] == first
            assert await jobs_on(c, 6) == [on_slow] * 6

            # (2) the front end reported the answers' hop timings; the optimizer learned from them and logged how far
            # its predictions were from the measured latency, before and after learning
            def learned_for_plan():
                return [e for e in _events(cluster, "costs_learned") if on_slow in e["plans"]]

            learned = (await eventually(learned_for_plan, timeout=60, interval=0.5))[-1]
            fig = learned["plans"][on_slow]
            assert fig["measured"] > 0 and fig["predicted_base"] > 0 and fig["predicted_learned"] > 0, learned
            assert set(learned["speed_factor"]) <= {"phone", "cloud1"} and learned["speed_factor"], learned

            # (3) the cloud plan is nobody's choice now: out of the table, then off the servers
            await eventually(lambda: any(first in " ".join(e["plans"]) for e in _events(cluster, "retired")),
                             timeout=60, interval=0.5)
            table, _ = await primary(c)
            assert first not in [p["id"] for p in table["plans"]]

            async def unloaded():
                return not await c.registry.placement(f"{NAME}:{first}")

            await eventually(unloaded, timeout=60, interval=0.5, message=f"{NAME}:{first} unloaded")

            # (4) the link widens: the cloud comes back under a new id
            await c.set_links({"device-cloud": (0.005, FAST * MBIT)})

            async def back():
                table, pid = await primary(c)
                return pid if pid not in (first, on_slow) and _first_server(table, pid) == "cloud1" else None

            on_fast = await eventually(back, timeout=120, interval=0.5,
                                       message=lambda: f"a cloud plan again; optimizer said "
                                                       f"{_events(cluster, 'replanned')}")
            assert set(await jobs_on(c, 3)) == {on_fast}

    asyncio.run(go())


def _small_model():
    """The same job as _model (input `img`, output `head`) with a fraction of the work: a variant."""
    from splitinfer import _tf  # noqa: F401
    import keras
    from keras import layers

    keras.utils.set_random_seed(12)
    inp = keras.Input(SHAPE, name="img")
    x = layers.Conv2D(8, 3, strides=4, padding="same", name="reduce")(inp)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="light0")(x)
    out = layers.Dense(10, name="head")(layers.GlobalAveragePooling2D(name="gap")(x))
    return keras.Model(inp, out, name="shrink_small")


def test_a_deployment_of_two_variants_serves_the_small_one_under_a_tight_budget(cluster, model_file, tmp_path):
    path, large = model_file
    small = _small_model()
    small_path = tmp_path / "small.keras"
    small.save(small_path)

    async def go():
        async with Client(cluster.settings) as c:
            await c.wait_for_servers(2, timeout=120)
            reply = await c.deploy_model(path, "variants", max_plans=2, accuracy=0.76,
                                         variants=[{"name": "small", "model": str(small_path), "accuracy": 0.68}],
                                         timeout=600)
            plans = reply["table"]["plans"]
            assert {p["variant"] for p in plans} == {"reference", "small"}, plans
            assert {p["variant"]: p["accuracy"] for p in plans} == {"reference": 0.76, "small": 0.68}
            fastest = {v: min(p["latency"] for p in plans if p["variant"] == v) for v in ("reference", "small")}
            assert fastest["small"] < fastest["reference"], fastest
            variant_of = {p["id"]: p["variant"] for p in plans}
            tight = (fastest["small"] + fastest["reference"]) / 2
            x = _x(5)
            for budget, want, model in ((tight, "small", small), (None, "reference", large)):
                r = await c.infer("variants", x, deadline_s=30, max_latency_s=budget)
                assert variant_of[r.plan] == want, (budget, r.plan, plans)
                np.testing.assert_allclose(next(iter(r.outputs.values())), np.asarray(model(x)), atol=TOL)
            r = await c.infer("variants", x, deadline_s=30, max_latency_s=tight * 20, min_accuracy=0.7)
            assert variant_of[r.plan] == "reference"
            await c.undeploy("variants")

    asyncio.run(go())
