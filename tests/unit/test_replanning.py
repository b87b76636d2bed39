"""Run-time re-planning decisions (planner.adaptive): a better plan is adopted only when it beats every deployed
plan by the threshold, at `hold` checks in a row, after the cooldown; unused plans retire, the table stays bounded."""

from __future__ import annotations

import pytest

from splitinfer.planner import Cluster, CostGraph, CostModel, CostNode, Link, PlanError, Server, plan_deployment
from splitinfer.planner.adaptive import ReplanPolicy, Replanner, better_plan, plans_in_use

MBPS = 1e6 / 8


def chain() -> CostGraph:
    """A 1 MB input reduced to 4 KB by a cheap first op, then heavy ops: cut after op0 on a slow link, send the
    input on a fast one."""
    nodes = [CostNode("op0", 2e8, ("x:0",), ("op0:0",), 0),
             CostNode("op1", 4e9, ("op0:0",), ("op1:0",), 0),
             CostNode("op2", 4e9, ("op1:0",), ("op2:0",), 0)]
    return CostGraph(nodes, {"x:0": 1_000_000, "op0:0": 4_000, "op1:0": 4_000, "op2:0": 40}, ["x:0"], ["op2:0"],
                     name="chain")


def cluster(mbps: float, device_speed: float = 4.0) -> Cluster:
    return Cluster(servers=[Server(name="dev", site="device", speed=device_speed),
                            Server(name="cloud", site="cloud", speed=200.0)],
                   links=[Link(a="device", b="cloud", rtt=0.01, bandwidth=mbps * MBPS)], client="dev")


def deployed(mbps: float):
    return plan_deployment(chain(), cluster(mbps), "latency", max_plans=1, name="m")


def test_a_narrower_link_yields_a_better_plan_and_an_unchanged_one_none():
    table = deployed(1000)
    assert [p.server for p in table.get(table.primary).parts] == ["cloud"]  # everything goes to the cloud
    assert better_plan(table, chain(), cluster(1000), 0.15) is None
    found = better_plan(table, chain(), cluster(5), 0.15)
    assert found is not None
    assert [p.server for p in found.plan.parts] == ["dev", "cloud"] and found.plan.cuts == ["op0:0"]
    # the deployed plan was re-predicted on the narrow link; the new one beats it by the reported gain
    assert found.best_deployed.latency > found.plan.latency
    assert found.gain == pytest.approx(1 - found.plan.latency / found.best_deployed.latency)
    # a threshold above the gain keeps the deployed plans
    assert better_plan(deployed(1000), chain(), cluster(5), found.gain + 0.01) is None
    assert found.describe(table)["after_latency_ms"] < found.describe(table)["before_latency_ms"]


def test_a_plan_already_in_the_table_is_not_found_again():
    table = plan_deployment(chain(), cluster(1000), "latency", max_plans=6, name="m")
    fast_link_best = table.get(table.primary)
    table.plans.append(deployed(5).plans[0])  # the narrow-link plan, deployed already
    table.plans[-1].id = "r1"
    assert better_plan(table, chain(), cluster(5), 0.15) is None
    assert fast_link_best in table.plans


def test_energy_deployments_compare_energy():
    from splitinfer.planner import PowerProfile

    def c(mbps):
        base = cluster(mbps)
        dev = base.servers[0].model_copy(update={"power": PowerProfile(compute_w=5, radio_w=1, idle_w=0.1)})
        return base.model_copy(update={"servers": [dev, base.servers[1]]})

    table = plan_deployment(chain(), c(1000), "energy", max_plans=1, name="m")
    found = better_plan(table, chain(), c(2), 0.05)
    assert found is not None and found.plan.energy < found.best_deployed.energy
    assert "before_energy_j" in found.describe(table)


def test_hysteresis_needs_the_same_plan_on_hold_checks_and_respects_the_cooldown():
    table = deployed(1000)
    r = Replanner(ReplanPolicy(hold=2, cooldown_s=30), deploy_size=1)
    slow = better_plan(table, chain(), cluster(5), 0.15)
    assert r.observe(slow, now=100) is False          # once: not yet
    assert r.observe(None, now=101) is False          # the link came back: the streak restarts
    assert r.observe(slow, now=102) is False
    assert r.observe(slow, now=103) is True           # twice in a row
    r.adopted(103)
    assert r.observe(slow, now=110) is False and r.observe(slow, now=120) is False  # within the cooldown
    assert r.observe(slow, now=134) is True


def test_unused_plans_retire_above_the_deploy_size_and_the_bound_holds():
    table = deployed(1000)
    table.plans.append(deployed(5).plans[0])
    table.plans[-1].id = "r1"
    table.primary = "r1"
    r = Replanner(ReplanPolicy(retire_after_s=60, max_plans=4), deploy_size=1)
    better_plan(table, chain(), cluster(5), 0.15)  # re-predicts: on the narrow link requests get r1 only
    assert plans_in_use(table) == {"r1"}
    assert r.stale(table, now=0) == []        # first seen: counts as used now
    assert r.stale(table, now=30) == []      # not unused long enough
    assert r.stale(table, now=61) == ["p0"]
    # never below the deploy size, never the primary
    assert Replanner(ReplanPolicy(retire_after_s=0), deploy_size=2).stale(table, now=1000) == []
    # above max_plans the longest unused goes at once
    bounded = Replanner(ReplanPolicy(retire_after_s=1e9, max_plans=1), deploy_size=1)
    assert bounded.stale(table, now=0) == ["p0"]


def test_policy_bounds_are_checked():
    with pytest.raises(PlanError):
        ReplanPolicy(threshold=1.5)
    with pytest.raises(PlanError):
        ReplanPolicy(hold=0)


# ------------------------------------------------------------------------------ learning from hop timings

def test_learned_costs_recover_a_slower_server_and_the_hop_overhead():
    from splitinfer.messages import DeploymentLatency, HopStat
    from splitinfer.planner.learning import learn
    from splitinfer.planner.optimize import predict_plan

    graph, base = chain(), cluster(5)
    table = plan_deployment(graph, base, "latency", max_plans=6, name="m")
    # the "truth": the cloud computes 2.5x slower than its calibration says, each tensor hop costs 4 ms
    truth = base.model_copy(update={
        "servers": [base.servers[0], base.servers[1].model_copy(update={"speed": base.servers[1].speed / 2.5})],
        "broker": base.broker.model_copy(update={"per_message": 4e-3})})
    cm = CostModel(graph, truth)
    hops, lats = [], []
    for p in table.plans:
        dep = f"m:{p.id}"
        for i, part in enumerate(p.parts):
            s = cm.idx[part.server]
            hops.append(HopStat(deployment=dep, part=f"part{i}", server=part.server, transfer_s=0.01,
                                compute_s=cm.compute(sum(graph.nodes[n].cost for n in part.nodes), s), samples=20))
        lats.append(DeploymentLatency(deployment=dep, latency_s=predict_plan(table, graph, truth, p).latency,
                                      samples=20))
    learned = learn(table, graph, base, hops, lats)
    assert learned.speed_factor["cloud"] == pytest.approx(2.5, rel=1e-6)
    assert learned.speed_factor.get("dev", 1.0) == pytest.approx(1.0, rel=1e-6)
    assert learned.per_message == pytest.approx(4e-3, rel=1e-6)
    for pid, e in learned.errors.items():
        assert e["predicted_learned"] == pytest.approx(e["measured"], rel=1e-6), pid
    assert any(abs(e["predicted_base"] / e["measured"] - 1) > 0.1 for e in learned.errors.values())
    # the learned cluster predicts what was measured
    for p in table.plans:
        assert predict_plan(table, graph, learned.apply(base), p).latency == pytest.approx(
            predict_plan(table, graph, truth, p).latency, rel=1e-6)


def test_too_few_samples_teach_nothing_and_odd_reports_are_bounded():
    from splitinfer.messages import DeploymentLatency, HopStat
    from splitinfer.planner.learning import SPEED_FACTOR_BOUNDS, learn

    graph, base = chain(), cluster(5)
    table = plan_deployment(graph, base, "latency", max_plans=1, name="m")
    dep, p = f"m:{table.plans[0].id}", table.plans[0]
    few = [HopStat(deployment=dep, part="part0", server=p.parts[0].server, transfer_s=0.0, compute_s=9.0, samples=2)]
    assert learn(table, graph, base, few, [DeploymentLatency(deployment=dep, latency_s=9.0, samples=2)]).speed_factor == {}
    odd = [few[0].model_copy(update={"samples": 50, "compute_s": 1e6})]
    assert learn(table, graph, base, odd, []).speed_factor[p.parts[0].server] == SPEED_FACTOR_BOUNDS[1]
    other = [few[0].model_copy(update={"deployment": "other:p0", "samples": 50})]
    assert learn(table, graph, base, other, []).speed_factor == {}


def test_a_latency_window_older_than_its_plans_last_prediction_change_teaches_no_overhead():
    from splitinfer.messages import DeploymentLatency
    from splitinfer.planner.learning import StableSince, learn

    graph = chain()
    table = plan_deployment(graph, cluster(5), "latency", max_plans=1, name="m")
    lat = [DeploymentLatency(deployment=f"m:{table.plans[0].id}", latency_s=5.0, samples=30, since=100.0)]
    stable = StableSince()
    assert learn(table, graph, cluster(5), [], lat, stable, now=50.0).per_message is not None
    assert learn(table, graph, cluster(5.2), [], lat, stable, now=120.0).per_message is not None  # noise
    moved = learn(table, graph, cluster(1), [], lat, stable, now=150.0)  # the link changed under the window
    assert moved.per_message is None and moved.errors  # its error is still reported
    fresh = [lat[0].model_copy(update={"since": 160.0})]
    assert learn(table, graph, cluster(1), [], fresh, stable, now=170.0).per_message is not None


def test_the_hop_window_keeps_recent_samples_only():
    from splitinfer.monitor.hops import HopWindow

    w = HopWindow(size=4, max_age_s=10)
    clock = [1000.0]
    w.now = lambda: clock[0]
    hop = ["part0", "dev", 0.002, 0.0, 0.0, 0.010, 1, 0.0, "broker"]
    batched = ["part1", "cloud", 0.003, 0.0, 0.0, 0.050, 4, 0.0, "broker"]
    local = ["part1", "cloud", 0.0, 0.0, 0.0, 0.020, 1, 0.0, "local"]
    for i in range(6):
        w.add("m:p0", [hop, batched], latency_s=0.1 + i)
    w.add("m:p1", [local], latency_s=0.2)
    hops, lats = w.summary()
    by = {(h.deployment, h.part): h for h in hops}
    assert by[("m:p0", "part0")].compute_s == pytest.approx(0.010) and by[("m:p0", "part0")].samples == 4
    assert by[("m:p0", "part1")].compute_s is None          # batch-of-4 calls teach no per-request compute
    assert by[("m:p1", "part1")].transfer_s == 0.0           # a local hand-off is no hop
    assert {x.deployment: x.latency_s for x in lats}["m:p0"] == pytest.approx(3.6)  # median of the last 4
    clock[0] += 11
    assert w.summary() == ([], [])


# ------------------------------------------------------------------------------ model variants

def test_a_table_over_two_variants_gives_the_small_one_under_a_tight_budget_and_the_large_one_else():
    from splitinfer.planner import choose_plan
    from splitinfer.planner.table import variant_table

    def scaled(factor: float) -> CostGraph:
        g = chain()
        nodes = [CostNode(n.name, n.cost * factor, n.inputs, n.outputs, n.param_bytes) for n in g.nodes.values()]
        return CostGraph(nodes, {t: x.nbytes for t, x in g.tensors.items()}, list(g.inputs), list(g.outputs),
                         name="chain")

    c = cluster(1000)
    large = plan_deployment(scaled(1.0), c, "latency", max_plans=3, name="m")
    small = plan_deployment(scaled(0.1), c, "latency", max_plans=3, name="m")
    table = variant_table([("large", 0.76, large), ("small", 0.68, small)])
    assert len({p.id for p in table.plans}) == len(table.plans) == len(large.plans) + len(small.plans)
    assert {p.variant for p in table.plans} == {"large", "small"}
    assert table.get(table.primary).variant == "large"
    fastest = {v: min(p.latency for p in table.plans if p.variant == v) for v in ("large", "small")}
    assert fastest["small"] < fastest["large"]
    tight = (fastest["small"] + fastest["large"]) / 2
    assert choose_plan(table, max_latency=tight).variant == "small"
    assert choose_plan(table, max_latency=fastest["large"] * 2).variant == "large"
    assert choose_plan(table).variant == "large"
    assert choose_plan(table, max_latency=tight * 10, min_accuracy=0.7).variant == "large"
    with pytest.raises(PlanError, match="accuracy 0.8"):
        choose_plan(table, min_accuracy=0.8)
    with pytest.raises(PlanError, match="latency budget"):
        choose_plan(table, max_latency=tight, min_accuracy=0.7)
    # the table survives its JSON form (the pool stores it, front ends receive it)
    from splitinfer.planner import PlanTable
    again = PlanTable.from_json(table.to_json())
    assert [(p.id, p.variant, p.accuracy) for p in again.plans] == [(p.id, p.variant, p.accuracy) for p in table.plans]


def test_per_job_choice_keeps_to_the_primary_among_plans_a_few_percent_apart():
    from splitinfer.planner import choose_plan
    from splitinfer.planner.table import PRIMARY_MARGIN, keep_primary_current

    table = plan_deployment(chain(), cluster(5), "latency", max_plans=6, name="m")
    assert len(table.plans) >= 2
    fast, other = sorted(table.plans, key=lambda p: p.latency)[:2]
    table.primary = other.id
    other.latency = fast.latency * (1 + PRIMARY_MARGIN / 2)      # within the margin: the primary stays
    assert choose_plan(table).id == other.id
    assert not keep_primary_current(table, table.plans) and table.primary == other.id
    assert choose_plan(table, max_latency=fast.latency).id == fast.id  # a budget the primary misses
    other.latency = fast.latency * (1 + 3 * PRIMARY_MARGIN)      # clearly slower: the best answers, primary moves
    assert choose_plan(table).id == fast.id
    assert keep_primary_current(table, table.plans) and table.primary == fast.id
