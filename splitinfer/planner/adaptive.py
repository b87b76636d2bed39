"""Run-time re-planning decisions for a deployed plan table: when a new plan is worth deploying, and which plans
have outlived their use. Pure: the optimizer actor does the deploying.

Why hysteresis: measured links and loads are noisy, and a deploy (split, upload, load) costs seconds of work on
the servers. A new plan is adopted only when it beats every deployed plan by more than `threshold` on the
deployment's objective, at `hold` checks in a row (the same plan each time), and never sooner than `cooldown_s`
after the deployment's last change. A plan is "in use" while some request would get it: the objective's choice,
the low-battery choice, the best fidelity, or the fallback when one of its servers is down. Plans nobody would
get for `retire_after_s` are retired once the table holds more plans than it started with; above `max_plans`
the longest unused goes at once. The primary (the objective's current best) is never retired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from splitinfer.planner.chain import Compression, plan_chain
from splitinfer.planner.model import Cluster, CostGraph, PlanError
from splitinfer.planner.optimize import plan_deployment, repredict
from splitinfer.planner.plan import Plan
from splitinfer.planner.table import OBJECTIVE_ORDER, PlanTable, choose_plan


SCREENED = ("latency", "energy")  # objectives the chain DP screens before the whole table is planned again
SCREEN_FRACTION = 0.5             # the chain's gain must reach this share of the threshold to plan in full


@dataclass(frozen=True)
class ReplanPolicy:
    threshold: float = 0.15       # a new plan must be predicted this much better (fraction) than every deployed one
    hold: int = 2                 # ... at this many consecutive checks
    cooldown_s: float = 30.0      # the least time between two changes of one deployment
    max_plans: int = 8            # the table never holds more
    retire_after_s: float = 300.0  # a plan no request would get for this long is retired (above the deploy size)

    def __post_init__(self):
        if not 0 <= self.threshold < 1:
            raise PlanError(f"replan threshold must be in [0, 1), not {self.threshold}")
        if self.hold < 1 or self.max_plans < 1:
            raise PlanError("replan hold and max_plans must be at least 1")


def objective_score(table: PlanTable, plan: Plan) -> float:
    """The figure the deployment's objective minimises: latency, device energy or the busiest stage's time."""
    return {"energy": plan.energy, "throughput": plan.bottleneck}.get(table.objective, plan.latency)


@dataclass(frozen=True)
class Improvement:
    plan: Plan          # the new plan (its id not set yet)
    best_deployed: Plan  # the deployed plan it beats
    gain: float         # 1 - new score / best deployed score

    def describe(self, table: PlanTable) -> dict:
        what = {"energy": "energy_j", "throughput": "bottleneck_ms"}.get(table.objective, "latency_ms")
        scale = 1.0 if table.objective == "energy" else 1e3
        return {"objective": table.objective, "before_plan": self.best_deployed.id,
                "before": self.best_deployed.describe(), f"before_{what}": round(objective_score(table, self.best_deployed) * scale, 3),
                "after": self.plan.describe(), f"after_{what}": round(objective_score(table, self.plan) * scale, 3),
                "before_latency_ms": round(self.best_deployed.latency * 1e3, 3),
                "after_latency_ms": round(self.plan.latency * 1e3, 3), "gain": round(self.gain, 4)}


def better_plan(table: PlanTable, graph: CostGraph, cluster: Cluster, threshold: float, *,
                compression: Compression | None = None, time_limit: float = 0.1) -> Improvement | None:
    """The objective's best plan on the cluster as it is now, when it beats every deployed plan the cluster can
    still run by more than `threshold` (the table's plans are re-predicted on `cluster` first); else None."""
    repredict(table, graph, cluster)
    known = {s.name for s in cluster.servers}
    runnable = [p for p in table.plans if p.servers <= known]
    order = OBJECTIVE_ORDER.get(table.objective, OBJECTIVE_ORDER["latency"])
    if runnable and table.objective in SCREENED:
        # the exact chain DP costs milliseconds, the whole table a good part of a second: when even the chain's
        # best is not close to the margin, nothing else will be adopted (only plans splitting parallel branches
        # could still win, and by less than the chain would need to)
        try:
            quick = plan_chain(graph, cluster, table.objective, max_latency=table.sla, compression=compression)
            best_now = objective_score(table, min(runnable, key=order))
            if best_now <= 0 or 1.0 - objective_score(table, quick) / best_now <= threshold * SCREEN_FRACTION:
                return None
        except PlanError:
            pass
    try:
        fresh = plan_deployment(graph, cluster, table.objective, sla=table.sla, compression=compression,
                                max_plans=1, name=table.name, time_limit=time_limit)
    except PlanError:
        return None  # nothing meets the SLA now: the deployed plans are as good as anything
    new = fresh.get(fresh.primary)
    if any(p.key() == new.key() for p in table.plans):
        return None
    if not runnable:
        return Improvement(new, new, 1.0)
    best = min(runnable, key=order)
    before, after = objective_score(table, best), objective_score(table, new)
    gain = 1.0 - after / before if before > 0 else 0.0
    return Improvement(new, best, gain) if gain > threshold else None


def plans_in_use(table: PlanTable) -> set[str]:
    """Ids of the plans some request would get now (see the module docstring)."""
    used: set[str] = set()
    for kwargs in ({}, {"battery_level": 0.0}):
        try:
            used.add(choose_plan(table, **kwargs).id)
        except PlanError:
            pass
    if table.plans:
        used.add(max(table.plans, key=lambda p: (p.fidelity, -p.latency)).id)
    for server in {s for p in table.plans for s in p.servers} - {table.client}:
        try:
            used.add(choose_plan(table, down_servers=[server]).id)
        except PlanError:
            pass
    return used


@dataclass
class Replanner:
    """One deployment's re-planning state: the candidate seen at consecutive checks, when plans were last in use,
    when it last changed."""

    policy: ReplanPolicy
    deploy_size: int                       # plans the table had at deploy time
    candidate: tuple | None = None
    streak: int = 0
    changed_at: float = -math.inf
    last_used: dict[str, float] = field(default_factory=dict)

    def observe(self, found: Improvement | None, now: float) -> bool:
        """Whether to adopt `found` now: the same plan `hold` checks running and the cooldown over."""
        key = found.plan.key() if found else None
        if key is None or key != self.candidate:
            self.candidate, self.streak = key, 0
        if key is None:
            return False
        self.streak += 1
        return self.streak >= self.policy.hold and now - self.changed_at >= self.policy.cooldown_s

    def adopted(self, now: float) -> None:
        self.candidate, self.streak, self.changed_at = None, 0, now

    def failed(self, now: float) -> None:
        """A deploy of the candidate failed: wait a cooldown before trying again."""
        self.adopted(now)

    def stale(self, table: PlanTable, now: float) -> list[str]:
        """Plans to retire now; stamps the plans in use first (a plan first seen counts as used now)."""
        for pid in plans_in_use(table):
            self.last_used[pid] = now
        for p in table.plans:
            self.last_used.setdefault(p.id, now)
        for pid in list(self.last_used):
            if all(p.id != pid for p in table.plans):
                del self.last_used[pid]
        spare = [p for p in table.plans if p.id != table.primary]
        spare.sort(key=lambda p: self.last_used[p.id])  # longest unused first
        out: list[str] = []
        size = len(table.plans)
        for p in spare:
            over_bound = size > self.policy.max_plans
            unused = now - self.last_used[p.id] >= self.policy.retire_after_s and size > self.deploy_size
            if not (over_bound or unused):
                break
            out.append(p.id)
            size -= 1
        return out
