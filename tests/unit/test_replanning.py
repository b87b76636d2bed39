"""Run-time re-planning decisions (planner.adaptive): a better plan is adopted only when it beats every deployed
plan by the threshold, at `hold` checks in a row, after the cooldown; unused plans retire, the table stays bounded."""

from __future__ import annotations

import pytest

from splitinfer.planner import Cluster, CostGraph, CostNode, Link, PlanError, Server, plan_deployment
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
