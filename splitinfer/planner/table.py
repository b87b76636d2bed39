"""The plan table of a deployed model and the per-request choice among its plans."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from splitinfer.planner.chain import Compression, chain_pareto
from splitinfer.planner.milp import MILP_MAX_SERVERS, plan_dag
from splitinfer.planner.model import Cluster, CostGraph, PlanError
from splitinfer.planner.plan import Plan, dominates, unique_plans


def pareto(plans: Iterable[Plan]) -> list[Plan]:
    """Plans no other plan beats on (latency, device energy, fidelity); one per distinct point, fastest first."""
    plans = list(plans)
    seen: dict[tuple, Plan] = {}
    for p in sorted(plans, key=lambda p: (p.latency, p.energy, -p.fidelity, len(p.parts))):
        if not any(dominates(q, p) for q in plans):
            seen.setdefault((p.latency, p.energy, p.fidelity), p)
    return list(seen.values())


@dataclass
class PlanTable:
    model: str
    client: str
    servers: list[str]
    plans: list[Plan] = field(default_factory=list)
    # a deployed table (planner/optimize.py): its deployment name, what it optimises, its best plan for that,
    # the SLA every plan meets, and the fidelity figures behind compressed cuts
    name: str = ""
    objective: str = "latency"
    primary: str = ""
    sla: float | None = None
    compression: dict[str, dict[str, float]] = field(default_factory=dict)
    revision: int = 0  # how many times run-time re-planning changed it (new plans are named r<revision>)

    def __iter__(self):
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)

    def get(self, plan_id: str) -> Plan:
        for p in self.plans:
            if p.id == plan_id:
                return p
        raise PlanError(f"unknown plan {plan_id!r} (table has {', '.join(p.id for p in self.plans)})")

    def to_json(self) -> dict:
        return {"model": self.model, "client": self.client, "servers": self.servers,
                "plans": [p.to_json() for p in self.plans], "name": self.name, "objective": self.objective,
                "primary": self.primary, "sla": self.sla, "compression": self.compression,
                "revision": self.revision}

    @classmethod
    def from_json(cls, data: Mapping) -> PlanTable:
        return cls(data["model"], data["client"], list(data["servers"]), [Plan.from_json(p) for p in data["plans"]],
                   name=data.get("name", ""), objective=data.get("objective", "latency"),
                   primary=data.get("primary", ""), sla=data.get("sla"),
                   compression={t: dict(c) for t, c in (data.get("compression") or {}).items()},
                revision=int(data.get("revision", 0)))


def build_plan_table(
    graph: CostGraph,
    cluster: Cluster,
    *,
    compression: Compression | None = None,
    fallbacks: bool = True,
    dag: bool = True,
    milp_max_nodes: int = 8,
    time_limit: float = 5.0,
) -> PlanTable:
    """Candidates: the chain DP's whole Pareto front (every cut-point plan worth having, compression included),
    plus the integer program's latency-, energy- and throughput-optimal DAG plans (coarsened to milp_max_nodes
    blocks when bigger). Kept: the Pareto set over (latency, device energy, fidelity); with `fallbacks`, also
    every plan that is Pareto-optimal when one server (not the client) is down, marked in `fallback_for`."""
    cluster.check()
    candidates: list[Plan] = list(chain_pareto(graph, cluster, compression=compression))
    chain_servers = sorted({s for p in candidates for s in p.servers})
    if dag:
        objectives = ["latency", "throughput"] + (["energy"] if cluster.server(cluster.client).power else [])
        for obj in objectives:
            try:
                candidates.append(plan_dag(graph, cluster, obj, max_nodes=milp_max_nodes, time_limit=time_limit,
                                           max_servers=MILP_MAX_SERVERS, prefer=chain_servers))
            except PlanError:
                pass
    # A server no Pareto-optimal plan uses leaves the Pareto set unchanged when it goes down, so only the servers
    # the front actually uses need a fallback search.
    used = {s for p in pareto(candidates) for s in p.servers}
    others = [s.name for s in cluster.servers if s.name != cluster.client and s.name in used]
    if fallbacks:
        for down in others:
            try:
                candidates += chain_pareto(graph, cluster, compression=compression, exclude=[down])
            except PlanError:
                continue
    candidates = unique_plans(candidates)
    base = pareto(candidates)
    kept: dict[tuple, Plan] = {p.key(): p for p in base}
    if fallbacks:
        for down in others:
            for p in pareto(c for c in candidates if down not in c.servers):
                if p.key() not in {b.key() for b in base}:
                    kept.setdefault(p.key(), p)
                    if down not in kept[p.key()].fallback_for:
                        kept[p.key()].fallback_for.append(down)
    plans = sorted(kept.values(), key=lambda p: (p.latency, p.energy, -p.fidelity))
    for i, p in enumerate(plans):
        p.id = f"p{i}"
    return PlanTable(graph.name, cluster.client, [s.name for s in cluster.servers], plans)


def choose_plan(
    table: PlanTable,
    max_latency: float | None = None,
    battery_level: float | None = None,
    min_fidelity: float | None = None,
    down_servers: Iterable[str] = (),
    *,
    min_accuracy: float | None = None,
    low_battery: float = 0.3,
) -> Plan:
    """Pick the plan for one request.

    Policy: drop plans that use a down server, then plans below min_fidelity or min_accuracy, then plans slower
    than max_latency (seconds). With battery_level (0..1) below low_battery, take the plan with the least device
    energy (ties: the faster); otherwise the best plan for the table's objective: the fastest (latency; ties: the
    least energy), the least device energy (energy; ties: the faster) or the highest pipelined throughput
    (throughput; ties: the faster). In a table spanning model variants the most accurate plan left comes first
    (a variant trades accuracy for time: a tight budget leaves the small one, a loose one the large), then the
    objective. Raises PlanError naming the constraint that nothing meets and the best value on offer.
    """
    down = set(down_servers)
    unknown = sorted(down - set(table.servers))
    if unknown:
        raise PlanError(f"unknown server {unknown[0]!r} (known: {', '.join(table.servers)})")
    if battery_level is not None and not 0.0 <= battery_level <= 1.0:
        raise PlanError(f"battery_level must be between 0 and 1, not {battery_level}")
    if not table.plans:
        raise PlanError(f"the plan table of {table.model} is empty")
    live = [p for p in table.plans if not (p.servers & down)]
    if not live:
        raise PlanError(f"every plan of {table.model} uses a down server ({', '.join(sorted(down))})")
    if min_fidelity is not None:
        ok = [p for p in live if p.fidelity >= min_fidelity]
        if not ok:
            best = max(live, key=lambda p: p.fidelity)
            raise PlanError(f"no plan reaches fidelity {min_fidelity:g}: best available is {best.fidelity:g} ({best.id})")
        live = ok
    if min_accuracy is not None:
        ok = [p for p in live if (p.accuracy if p.accuracy is not None else p.fidelity) >= min_accuracy]
        if not ok:
            best = max(live, key=lambda p: p.accuracy if p.accuracy is not None else p.fidelity)
            raise PlanError(f"no plan reaches accuracy {min_accuracy:g}: best available is "
                            f"{best.accuracy if best.accuracy is not None else best.fidelity:g} ({best.id})")
        live = ok
    if max_latency is not None:
        ok = [p for p in live if p.latency <= max_latency]
        if not ok:
            best = min(live, key=lambda p: p.latency)
            raise PlanError(
                f"latency budget {max_latency * 1e3:.3g} ms is unreachable: best achievable is "
                f"{best.latency * 1e3:.3g} ms ({best.id}: {best.describe()})"
            )
        live = ok
    if battery_level is not None and battery_level < low_battery:
        return min(live, key=lambda p: (p.energy, p.latency))
    order = OBJECTIVE_ORDER.get(table.objective, OBJECTIVE_ORDER["latency"])
    if any(p.accuracy is not None for p in live):
        return min(live, key=lambda p: (-(p.accuracy if p.accuracy is not None else 0.0), *order(p)))
    best = min(live, key=order)
    primary = next((p for p in live if p.id == table.primary), None)
    return primary if primary is not None and not beats_primary(table, best, primary) else best


# Per-job choice keeps to the table's primary unless another plan is better by more than this on the objective:
# plans a few percent apart would otherwise take turns on every re-prediction's noise
PRIMARY_MARGIN = 0.05


def beats_primary(table: PlanTable, plan: Plan, primary: Plan) -> bool:
    score = OBJECTIVE_ORDER.get(table.objective, OBJECTIVE_ORDER["latency"])
    return score(plan)[0] < score(primary)[0] * (1.0 - PRIMARY_MARGIN)


def keep_primary_current(table: PlanTable, runnable: Iterable[Plan]) -> bool:
    """After a re-prediction: the primary moves to the objective's best runnable plan when that beats it by more
    than PRIMARY_MARGIN (or the primary cannot run). True when it moved."""
    runnable = list(runnable)
    if not runnable:
        return False
    best = min(runnable, key=OBJECTIVE_ORDER.get(table.objective, OBJECTIVE_ORDER["latency"]))
    primary = next((p for p in runnable if p.id == table.primary), None)
    if primary is None or (best is not primary and beats_primary(table, best, primary)):
        table.primary = best.id
        return primary is not best
    return False


def variant_table(tables: list[tuple[str, float, PlanTable]]) -> PlanTable:
    """One plan table over model variants: [(variant, accuracy, its table)], the reference (most accurate) first
    wins ties. Every plan keeps its variant and gets accuracy = the variant's x its compression fidelity; ids are
    p0, p1, ... over all of them; the primary is the most accurate variant's primary."""
    if not tables:
        raise PlanError("no model variant to plan")
    plans: list[Plan] = []
    primary = None
    best = max(tables, key=lambda t: t[1])
    for variant, accuracy, table in tables:
        for p in table.plans:
            p.variant, p.accuracy = variant, accuracy * p.fidelity
            if table is best[2] and p.id == table.primary:
                primary = p
            plans.append(p)
    for i, p in enumerate(plans):
        p.id = f"p{i}"
    ref = best[2]
    out = PlanTable(ref.model, ref.client, sorted({s for _, _, t in tables for s in t.servers}), plans,
                    name=ref.name, objective=ref.objective, primary=primary.id if primary else plans[0].id,
                    sla=ref.sla, compression=ref.compression)
    return out


# the plan a job without a battery constraint gets, by the deployment's objective: the least of these keys
OBJECTIVE_ORDER = {
    "latency": lambda p: (p.latency, p.energy),
    "energy": lambda p: (p.energy, p.latency),
    "throughput": lambda p: (p.bottleneck, p.latency),
}
