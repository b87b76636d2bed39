"""The cost model learns from the running cluster: what answers say the parts cost, folded into the Cluster the
planner plans on. Pure.

Every answer carries per-part compute and transfer times; the front ends report their recent medians
(messages.HopStat, DeploymentLatency). From them, against the cluster as the monitors describe it (the base):
- each server's compute factor: measured compute / predicted compute of the parts it ran (median over its parts,
  batch-of-one calls only), so a server slower than its calibration said (contention, thermal limits, a part on
  a worse runtime than profiled) is priced as it really is: its speed is divided by the factor;
- the per-tensor broker overhead that makes each plan's prediction meet its measured end-to-end latency (with
  the learned speeds): latency is linear in it, L(p) = L(0) + n p, so p = (measured - L(0)) / n; the median over
  the plans with enough samples. It carries whatever the hops cost that the model does not see (queueing, the
  front end's own work) and replaces the configured figure.
A latency window that began before its plan's prediction last moved (the links or loads changed under it) teaches
no overhead: it measured another cluster.
Always computed against the base, never against a learned cluster, so that learning has no feedback loop; bounded
(SPEED_FACTOR_BOUNDS, MAX_PER_MESSAGE_S) so one odd report cannot price a server out.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from splitinfer.messages import DeploymentLatency, HopStat, plan_deployment_name
from splitinfer.planner.costmodel import CostModel
from splitinfer.planner.model import Cluster, CostGraph, PlanError
from splitinfer.planner.optimize import predict_plan
from splitinfer.planner.plan import Plan, PlanPart
from splitinfer.planner.table import PlanTable

MIN_SAMPLES = 5                   # a window with fewer samples teaches nothing yet
SPEED_FACTOR_BOUNDS = (0.1, 10.0)
MAX_PER_MESSAGE_S = 0.05


@dataclass
class LearnedCosts:
    speed_factor: dict[str, float] = field(default_factory=dict)  # server -> measured / predicted compute
    per_message: float | None = None                             # seconds per tensor hop, None: keep the base's
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # plan id -> measured/base/learned (s)

    def apply(self, cluster: Cluster) -> Cluster:
        servers = [s.model_copy(update={"speed": s.speed / self.speed_factor[s.name]})
                   if s.name in self.speed_factor else s for s in cluster.servers]
        broker = cluster.broker if self.per_message is None else \
            cluster.broker.model_copy(update={"per_message": self.per_message})
        return cluster.model_copy(update={"servers": servers, "broker": broker})

    def describe(self) -> dict:
        return {"speed_factor": {s: round(f, 3) for s, f in sorted(self.speed_factor.items())},
                "per_message_ms": None if self.per_message is None else round(self.per_message * 1e3, 3),
                "plans": {pid: {k: round(v * 1e3, 2) for k, v in e.items()} for pid, e in self.errors.items()}}


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))


def _plan_parts(table: PlanTable) -> dict[str, tuple[Plan, dict[str, PlanPart]]]:
    """`<model>:<plan>` -> (plan, part name -> its PlanPart); split parts are named part0, part1, ... in order."""
    return {plan_deployment_name(table.name, p.id): (p, {f"part{i}": q for i, q in enumerate(p.parts)})
            for p in table.plans}


def _part_cost(graph: CostGraph, part: PlanPart, runtimes) -> float:
    costs = graph.runtime_costs.get(part.runtime) if part.runtime else None
    if costs is not None and all(n in costs for n in part.nodes):
        return sum(costs[n] for n in part.nodes)
    return graph.part_runtime(part.nodes, runtimes)[1]


PREDICTION_DRIFT = 0.15  # a plan's base prediction that moved by more than this since a window began: stale window


@dataclass
class StableSince:
    """Per plan: its base prediction when it last moved by more than PREDICTION_DRIFT, and when (wall clock). A
    latency window that began before then measured another cluster (the links or loads changed under it)."""

    reference: dict[str, tuple[float, float]] = field(default_factory=dict)  # plan id -> (prediction, since)

    def update(self, plan_id: str, predicted: float, now: float) -> float:
        ref = self.reference.get(plan_id)
        if ref is None:  # first seen: nothing says it moved
            self.reference[plan_id] = ref = (predicted, 0.0)
        elif abs(predicted - ref[0]) > PREDICTION_DRIFT * max(ref[0], 1e-9):
            self.reference[plan_id] = ref = (predicted, now)
        return ref[1]


def learn(table: PlanTable, graph: CostGraph, base: Cluster, hops: Sequence[HopStat],
          latencies: Iterable[DeploymentLatency], stable: StableSince | None = None,
          now: float = 0.0) -> LearnedCosts:
    """What the reports teach about this deployment's servers and hops (see the module docstring). With `stable`,
    a latency window that began before its plan's base prediction last moved teaches no hop overhead (its error
    is still reported)."""
    plans = _plan_parts(table)
    cm = CostModel(graph, base)
    ratios: dict[str, list[float]] = {}
    for h in hops:
        found = plans.get(h.deployment)
        if found is None or h.compute_s is None or h.samples < MIN_SAMPLES or h.server not in cm.idx:
            continue
        part = found[1].get(h.part)
        if part is None:
            continue
        s = cm.idx[h.server]
        predicted = cm.compute(_part_cost(graph, part, cm.servers[s].runtimes), s)
        if predicted > 0:
            ratios.setdefault(h.server, []).append(h.compute_s / predicted)
    out = LearnedCosts(speed_factor={s: _clamp(statistics.median(v), *SPEED_FACTOR_BOUNDS) for s, v in ratios.items()})
    sped = out.apply(base)
    at_zero = sped.model_copy(update={"broker": sped.broker.model_copy(update={"per_message": 0.0})})
    at_ms = sped.model_copy(update={"broker": sped.broker.model_copy(update={"per_message": 1e-3})})
    fits = []
    for lat in latencies:
        found = plans.get(lat.deployment)
        if found is None or lat.samples < MIN_SAMPLES:
            continue
        plan = found[0]
        try:
            l0 = predict_plan(table, graph, at_zero, plan).latency
            n = (predict_plan(table, graph, at_ms, plan).latency - l0) / 1e-3
            before = predict_plan(table, graph, base, plan).latency
        except PlanError:
            continue  # a plan on a server the cluster lacks now
        since = stable.update(plan.id, before, now) if stable is not None else 0.0
        if n > 0.5 and lat.since >= since:
            fits.append(_clamp((lat.latency_s - l0) / n, 0.0, MAX_PER_MESSAGE_S))
        out.errors[plan.id] = {"measured": lat.latency_s, "predicted_base": before, "_l0": l0, "_n": n}
    if fits:
        out.per_message = statistics.median(fits)
    for e in out.errors.values():
        p = out.per_message if out.per_message is not None else base.broker.per_message
        e["predicted_learned"] = e.pop("_l0") + e.pop("_n") * p
    return out

