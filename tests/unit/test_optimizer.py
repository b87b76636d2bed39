"""The optimizer's pure parts: cluster from monitor figures, the deployment's plan table (objective, SLA, cap),
re-prediction, the front end's view of who is down. No broker (`splitinfer plan` offline: e2e/test_cli_plan.py)."""

from __future__ import annotations

import json
import random

import pytest

from splitinfer.planner import (
    BrokerOverhead,
    CostGraph,
    LinkFigures,
    PlanError,
    PlanTable,
    PowerProfile,
    ServerDesc,
    build_cluster,
    choose_plan,
    combine_links,
    evaluate,
    parse_duration,
    plan_deployment,
    plan_deployment_name,
    repredict,
)
from tests.support.planner_cases import random_chain

MB = 1e6 / 8
POWER = PowerProfile(compute_w=5.0, radio_w=0.5, idle_w=0.1)


def three_sites(device_speed: float = 0.25, bw_mbps: float = 100.0):
    servers = [ServerDesc("phone", "device", speed=device_speed, power=POWER),
               ServerDesc("edge1", "edge", speed=0.5), ServerDesc("cloud1", "cloud", speed=1.0)]
    links = combine_links([], {("device", "edge"): LinkFigures(0.01, bw_mbps * MB),
                               ("edge", "cloud"): LinkFigures(0.02, 1000 * MB),
                               ("device", "cloud"): LinkFigures(0.03, bw_mbps * MB)},
                          None, ["device", "edge", "cloud"], BrokerOverhead())
    return build_cluster(servers, "device", links=links)


def chain(seed: int = 1, m: int = 10) -> CostGraph:
    g = random_chain(random.Random(seed), m)
    # the random chain's costs are FLOPs; make them reference seconds (a few ms per op) for speed factors
    return CostGraph.from_json({**g.to_json(), "unit": "seconds",
                                "nodes": [[n, c / 1e11, i, o, p] for n, c, i, o, p in g.to_json()["nodes"]]})


def test_combine_links_prefers_measured_then_configured_then_default():
    broker = BrokerOverhead(per_message=1e-3)
    measured = [("a", "b", LinkFigures(0.021, 10 * MB)), ("b", "a", LinkFigures(0.019, 5 * MB)),
                ("a", "c", LinkFigures(0.004, None))]
    configured = {("a", "c"): LinkFigures(0.5, 1 * MB), ("b", "c"): LinkFigures(0.05, 2 * MB),
                  ("c", "c"): LinkFigures(0.002, 100 * MB)}
    links = {frozenset((x.a, x.b)): x for x in combine_links(measured, configured, LinkFigures(0.1, 3 * MB),
                                                             ["a", "b", "c", "d"], broker)}
    # both directions merged: mean RTT less the broker's own per-message time, the narrower bandwidth
    assert links[frozenset("ab")].rtt == pytest.approx(0.019)
    assert links[frozenset("ab")].bandwidth == pytest.approx(5 * MB)
    # measured RTT wins; an unmeasurable bandwidth falls back to the configured one
    assert links[frozenset("ac")].rtt == pytest.approx(0.003)
    assert links[frozenset("ac")].bandwidth == pytest.approx(1 * MB)
    assert (links[frozenset("bc")].rtt, links[frozenset("bc")].bandwidth) == (0.05, 2 * MB)
    assert (links[frozenset("ad")].rtt, links[frozenset("ad")].bandwidth) == (0.1, 3 * MB)
    assert links[frozenset("c")].rtt == 0.002  # a site's own link when configured
    none = combine_links([], {}, None, ["a", "b"], broker)
    assert none[0].rtt == 0.0 and none[0].bandwidth >= 1e12  # nothing known: only the broker's cost is paid


def test_client_is_the_battery_server_at_the_front_ends_site_else_a_stand_in():
    servers = [ServerDesc("plug", "device"), ServerDesc("phone", "device", power=POWER),
               ServerDesc("cloud1", "cloud")]
    assert build_cluster(servers, "device").client == "phone"
    c = build_cluster(servers, "home")
    assert c.client == "client@home" and c.server("client@home").speed <= 1e-9
    with pytest.raises(PlanError, match="no live model server"):
        build_cluster([], "device")


def test_plan_table_objectives_sla_and_cap():
    g, cl = chain(), three_sites()
    fast = plan_deployment(g, cl, "latency", name="m")
    frugal = plan_deployment(g, cl, "energy", name="m")
    piped = plan_deployment(g, cl, "throughput", name="m")
    for t in (fast, frugal, piped):
        assert [p.id for p in t.plans] == [f"p{i}" for i in range(len(t.plans))]
        assert 1 <= len(t.plans) <= 6 and t.primary in {p.id for p in t.plans}
    assert fast.get(fast.primary).latency == min(p.latency for p in fast.plans)
    assert frugal.get(frugal.primary).energy == min(p.energy for p in frugal.plans)
    assert piped.get(piped.primary).bottleneck == min(p.bottleneck for p in piped.plans)
    # predictions are the cost model's, exactly
    for p in fast.plans:
        assert p.latency == pytest.approx(evaluate(g, cl, [(q.server, q.nodes) for q in p.parts]).latency)
    # an SLA drops the plans above it and names the best latency when nothing is left
    sla = sorted(p.latency for p in fast.plans)[len(fast.plans) // 2]
    within = plan_deployment(g, cl, "energy", sla=sla)
    assert within.plans and all(p.latency <= sla for p in within.plans) and within.sla == sla
    best = min(p.latency for p in fast.plans)
    with pytest.raises(PlanError, match=f"best achievable is {best * 1e3:.3g} ms"):
        plan_deployment(g, cl, "latency", sla=best * 0.5)
    one = plan_deployment(g, cl, "energy", max_plans=1)
    assert [p.id for p in one.plans] == ["p0"] and one.primary == "p0"
    assert one.plans[0].energy == pytest.approx(frugal.get(frugal.primary).energy)
    with pytest.raises(PlanError, match="objective"):
        plan_deployment(g, cl, "cheapest")


def test_table_round_trips_and_carries_what_the_front_end_needs():
    g, cl = chain(), three_sites()
    t = plan_deployment(g, cl, "energy", sla=1.0, name="m")
    back = PlanTable.from_json(json.loads(json.dumps(t.to_json())))
    assert (back.name, back.objective, back.primary, back.sla, back.client) == ("m", "energy", t.primary, 1.0, "phone")
    assert [p.key() for p in back.plans] == [p.key() for p in t.plans]
    g2 = CostGraph.from_json(json.loads(json.dumps(g.to_json())))
    assert g2.order == g.order and g2.total_cost == pytest.approx(g.total_cost)
    assert plan_deployment_name("m", "p1") == "m:p1"


def test_tight_budget_low_battery_and_loose_full_battery_choose_different_plans():
    g, cl = chain(), three_sites()
    t = plan_deployment(g, cl, "latency")
    fastest = min(t.plans, key=lambda p: p.latency)
    frugal = min(t.plans, key=lambda p: p.energy)
    assert fastest.id != frugal.id, "this cluster is built so that offloading saves energy but costs time"
    assert choose_plan(t, max_latency=10.0, battery_level=1.0).id == fastest.id
    assert choose_plan(t, max_latency=frugal.latency * 1.01, battery_level=0.1).id == frugal.id


def test_repredict_follows_the_cluster_and_keeps_plans_on_missing_servers():
    g = chain()
    t = plan_deployment(g, three_sites(), "latency")
    before = {p.id: p.latency for p in t.plans}
    slower = three_sites(bw_mbps=5.0)  # the device's links got narrower
    updated = repredict(t, g, slower)
    assert set(updated) == set(before)
    for p in t.plans:
        assert p.latency == pytest.approx(evaluate(g, slower, [(q.server, q.nodes) for q in p.parts]).latency)
        if p.servers != {"phone"}:
            assert p.latency > before[p.id]
    no_edge = build_cluster([ServerDesc("phone", "device", speed=0.25, power=POWER),
                             ServerDesc("cloud1", "cloud")], "device")
    kept = {p.id: p.latency for p in t.plans if "edge1" in p.servers}
    repredict(t, g, no_edge)
    assert all(t.get(pid).latency == lat for pid, lat in kept.items())


def test_parse_duration():
    assert parse_duration("50ms") == pytest.approx(0.05)
    assert parse_duration("0.2s") == pytest.approx(0.2)
    assert parse_duration("20") == pytest.approx(0.02)
    assert parse_duration(None) is None
    for bad in ("fast", "-3ms", "0", "nan"):
        with pytest.raises(PlanError):
            parse_duration(bad)


def test_server_watch_calls_silent_deregistered_and_unheard_servers_down():
    from splitinfer.actors.front_end.watch import ServerWatch
    from splitinfer.messages import ServerState

    w = ServerWatch(timeout_s=6.0)
    t0 = w.started
    w.heartbeat("phone", ServerState(battery=0.4), now=t0 + 1)
    w.heartbeat("edge1", ServerState(), now=t0 + 1)
    assert w.down(["phone", "edge1", "cloud1", "client@home"], now=t0 + 2) == set()  # cloud1: just started
    assert w.down(["phone", "edge1", "cloud1"], now=t0 + 6.5) == {"cloud1"}
    w.heartbeat("phone", ServerState(battery=0.3), now=t0 + 6)
    assert w.down(["phone", "edge1"], now=t0 + 8) == {"edge1"}
    w.deregister("phone")
    assert "phone" in w.down(["phone"], now=t0 + 8)
    assert w.battery("phone") == 0.3 and w.battery("nobody") is None
