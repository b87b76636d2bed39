"""From a cluster (live monitor state, or a cluster description) and a model's cost graph to a deployment's plan
table, and back to fresh predictions for it as the state changes.

Why one module for both: the optimizer actor (live state from the registry and the state pool) and
`splitinfer plan` (offline, from cluster.toml) must plan identically; only where the numbers come from differs.
Pure: no broker, no TensorFlow.

Units (planner/model.py): the cost graph is in reference seconds (the profile of the optimizer's machine), so a
server's `speed` is a factor: its calibrated GFLOP/s over the reference machine's, divided by its (emulated)
slowdown. Links are symmetric; a pair of sites measured by the network monitor in both directions is charged the
mean RTT (less the broker's own per-message time, which the cost model adds separately) and the narrower
bandwidth. The client is where a job's inputs start and its outputs end (the front end's site): the model
server at that site that reports a battery (else any server there); without one, a stand-in that can hold the
inputs but runs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from splitinfer.config import ClusterConfig
from splitinfer.messages import LinkSpec, LinkState, PowerSpec, split_pair
from splitinfer.planner.chain import Compression
from splitinfer.planner.costmodel import CostModel, evaluate
from splitinfer.planner.milp import MILP_MAX_SERVERS, plan_dag
from splitinfer.planner.model import (
    BrokerOverhead,
    Cluster,
    CostGraph,
    Link,
    PlanError,
    PowerProfile,
    Server,
    check_objective,
)
from splitinfer.planner.plan import Plan, unique_plans
from splitinfer.planner.table import PlanTable, build_plan_table, pareto

STAND_IN_SPEED = 1e-9  # the client stand-in: an operation there would take ~forever, so no plan puts one there
UNMEASURED_BANDWIDTH = 1e12  # bytes/s: a link too fast to measure (or not emulated) adds nothing per byte


@dataclass(frozen=True)
class ServerDesc:
    """One model server as the optimizer sees it (from its heartbeat state or a cluster description)."""

    name: str
    site: str
    speed: float = 1.0                     # relative to the reference (profiling) machine, slowdown included
    load: float = 0.0                      # fraction of its compute other work already takes (0..1)
    memory: int | None = None              # bytes of weights it may hold
    power: PowerProfile | None = None      # a battery device
    runtimes: tuple[str, ...] | None = None  # the part runtimes it can load; None: any


@dataclass(frozen=True)
class LinkFigures:
    rtt: float                  # seconds
    bandwidth: float | None     # bytes/s; None: unlimited (not measurable / not emulated)


def stand_in_name(site: str) -> str:
    return f"client@{site}"


def choose_client(servers: Sequence[ServerDesc], client_site: str) -> tuple[str, ServerDesc | None]:
    """(client name, stand-in to add or None): a battery server at the client's site, else any server there."""
    here = sorted((s for s in servers if s.site == client_site), key=lambda s: (s.power is None, s.name))
    if here:
        return here[0].name, None
    stand_in = ServerDesc(stand_in_name(client_site), client_site, speed=STAND_IN_SPEED)
    return stand_in.name, stand_in


def combine_links(measured: Iterable[tuple[str, str, LinkFigures]], configured: Mapping[tuple[str, str], LinkFigures],
                  default: LinkFigures | None, sites: Iterable[str], broker: BrokerOverhead) -> list[Link]:
    """One symmetric Link per pair of distinct sites: measured (both directions merged) over configured over the
    default; a pair with nothing known is instant (only the broker's own cost is paid)."""
    by_pair: dict[frozenset, list[LinkFigures]] = {}
    for a, b, fig in measured:
        if a != b:
            by_pair.setdefault(frozenset((a, b)), []).append(fig)
    conf = {frozenset(k): v for k, v in configured.items() if k[0] != k[1]}
    sites = sorted(set(sites))
    links = []
    for i, a in enumerate(sites):
        for b in sites[i + 1:]:
            pair = frozenset((a, b))
            figs = by_pair.get(pair)
            if figs:
                rtt = max(0.0, sum(f.rtt for f in figs) / len(figs) - broker.per_message)
                bws = [f.bandwidth for f in figs if f.bandwidth is not None]
                bw = min(bws) if bws else (conf[pair].bandwidth if pair in conf else None)
            elif pair in conf:
                rtt, bw = conf[pair].rtt, conf[pair].bandwidth
            elif default is not None:
                rtt, bw = default.rtt, default.bandwidth
            else:
                rtt, bw = 0.0, None
            links.append(Link(a=a, b=b, rtt=rtt, bandwidth=bw if bw else UNMEASURED_BANDWIDTH))
    # a site's own link, when configured (e.g. two edge boxes on a slow LAN)
    for pair, fig in configured.items():
        if pair[0] == pair[1]:
            links.append(Link(a=pair[0], b=pair[1], rtt=fig.rtt, bandwidth=fig.bandwidth or UNMEASURED_BANDWIDTH))
    return links


def link_figures(link: LinkSpec | LinkState) -> LinkFigures:
    """A configured (LinkSpec) or measured (LinkState) link in the planner's units: seconds and bytes/s."""
    return LinkFigures(link.rtt_ms / 1e3, None if link.bandwidth_mbps is None else link.bandwidth_mbps * 1e6 / 8)


def cluster_from(servers: Sequence[ServerDesc], client_site: str, *, broker: BrokerOverhead,
                 configured: Mapping[str, LinkSpec] | None = None, default: LinkSpec | None = None,
                 measured: Iterable[LinkState] = ()) -> Cluster:
    """The one way a Cluster is made: from live state (the optimizer: measured links, and the emulated ones when
    emulation is on) or from a cluster file (`splitinfer plan`: its links), so that both plan identically."""
    conf = {split_pair(key): link_figures(spec) for key, spec in (configured or {}).items()}
    meas = [(x.src_site, x.dst_site, link_figures(x)) for x in measured]
    sites = {s.site for s in servers} | {client_site}
    links = combine_links(meas, conf, link_figures(default) if default is not None else None, sites, broker)
    return build_cluster(servers, client_site, links=links, broker=broker)


def cluster_from_config(cfg: ClusterConfig, client_site: str | None, *, broker: BrokerOverhead,
                        default_power: PowerSpec) -> Cluster:
    """A cluster file as the planner's Cluster, in the reference machine's seconds: a server's speed is
    1 / its slowdown; a battery device (site "device" unless `battery` says otherwise) has its power figures or
    the default ones; the client at `client_site`, else the file's front_end_site, else the first server's site."""
    servers = []
    for spec in cfg.servers:
        battery = spec.battery if spec.battery is not None else spec.site == "device"
        power = spec.power or (default_power if battery else None)
        for pid in spec.process_ids():
            servers.append(ServerDesc(pid, spec.site, speed=1.0 / spec.slowdown,
                                      memory=int(spec.memory_mb * 1e6) if spec.memory_mb else None,
                                      power=PowerProfile(**power.model_dump()) if power else None))
    if not servers:
        raise PlanError("the cluster description has no [[servers]]")
    site = client_site if client_site is not None else (cfg.front_end_site or servers[0].site)
    return cluster_from(servers, site, broker=broker, configured=cfg.links, default=cfg.default_link)


def build_cluster(servers: Sequence[ServerDesc], client_site: str, *, links: Sequence[Link] = (),
                  broker: BrokerOverhead | None = None) -> Cluster:
    """The planner's Cluster; raises PlanError when there is no server at all."""
    if not servers:
        raise PlanError("no live model server to place parts on (start some: `splitinfer up --servers N`)")
    client, stand_in = choose_client(servers, client_site)
    descs = list(servers) + ([stand_in] if stand_in else [])
    return Cluster(
        servers=[Server(name=s.name, site=s.site, speed=max(s.speed, STAND_IN_SPEED), load=min(max(s.load, 0.0), 0.95),
                        memory=s.memory, power=s.power, runtimes=s.runtimes) for s in descs],
        links=list(links), client=client, broker=broker or BrokerOverhead())


def _trim(plans: list[Plan], primary: Plan, limit: int) -> list[Plan]:
    """At most `limit` plans, the primary first; then the best plan on each criterion, then one fallback for each
    server the kept plans use, then the rest fastest first. Fewer plans mean fewer parts for the servers to hold."""
    kept: dict[tuple, Plan] = {primary.key(): primary}

    def add(p: Plan | None) -> None:
        if p is not None and len(kept) < limit:
            kept.setdefault(p.key(), p)

    add(min(plans, key=lambda p: (p.latency, p.energy)))
    add(min(plans, key=lambda p: (p.energy, p.latency)))
    add(min(plans, key=lambda p: (p.bottleneck, p.latency)))
    add(max(plans, key=lambda p: (p.fidelity, -p.latency)))
    for server in sorted({s for p in kept.values() for s in p.servers}):
        add(min((p for p in plans if server not in p.servers), key=lambda p: p.latency, default=None))
    for p in sorted(plans, key=lambda p: p.latency):
        add(p)
    return list(kept.values())


MILP_TIME_LIMIT_S = 0.1  # per integer program: its best plan by then joins the candidates (the DP is exact)


def plan_deployment(graph: CostGraph, cluster: Cluster, objective: str = "latency", *, sla: float | None = None,
                    compression: Compression | None = None, max_plans: int = 6, name: str = "",
                    time_limit: float = MILP_TIME_LIMIT_S) -> PlanTable:
    """The plan table of one deployment: the Pareto set over (latency, device energy, fidelity) from the chain DP
    and the integer program, fallbacks for a server going down, and the throughput-optimal plan; only plans
    predicted within the SLA; at most max_plans. `primary` is the objective's best plan: the fastest (latency),
    the least device energy within the SLA (energy) or the highest pipelined throughput (throughput).
    The chain plans are exact; each integer program (DAG placements that split parallel branches) contributes
    the best plan it has after `time_limit` seconds, so a deploy plans in about a second even for big graphs.
    Raises PlanError when no plan meets the SLA, naming the best latency on offer."""
    check_objective(objective)
    if max_plans < 1:
        raise PlanError("max_plans must be at least 1")
    table = build_plan_table(graph, cluster, compression=compression, time_limit=time_limit)
    candidates = list(table.plans)
    if objective == "throughput":  # the table keeps the Pareto set over latency/energy/fidelity: bring it back
        try:
            candidates.append(plan_dag(graph, cluster, "throughput", max_nodes=8, time_limit=time_limit,
                                        max_servers=MILP_MAX_SERVERS,
                                        prefer=sorted({s for p in candidates for s in p.servers})))
        except PlanError:
            pass
    candidates = unique_plans(candidates)
    within = [p for p in candidates if sla is None or p.latency <= sla]
    if not within:
        best = min(candidates, key=lambda p: p.latency)
        raise PlanError(f"no plan meets the SLA of {sla * 1e3:.3g} ms: the best achievable is {best.latency * 1e3:.3g} ms "
                        f"({best.describe()})")
    if objective == "latency":
        primary = min(within, key=lambda p: (p.latency, p.energy))
    elif objective == "energy":
        primary = min(within, key=lambda p: (p.energy, p.latency))
    else:
        primary = min(within, key=lambda p: (p.bottleneck, p.latency))
    # the Pareto set (plus the throughput plan) and, for each down server, what is best without it
    front = {p.key() for p in pareto(within)} | {primary.key()}
    offered = [p for p in within if p.key() in front or p.fallback_for]
    plans = sorted(_trim(offered, primary, max_plans), key=lambda p: (p.latency, p.energy, -p.fidelity))
    for i, p in enumerate(plans):
        p.id = f"p{i}"
    out = PlanTable(graph.name, cluster.client, [s.name for s in cluster.servers], plans)
    out.name, out.objective, out.primary, out.sla = name, objective, primary.id, sla
    out.compression = {t: dict(c) for t, c in (compression or {}).items()}
    return out


def predict_plan(table: PlanTable, graph: CostGraph, cluster: Cluster, plan: Plan, cm: CostModel | None = None):
    """One plan of a table on `cluster` as it is now (its compressed cuts keep the table's fidelity figures)."""
    fid = {t: dict(c) for t, c in table.compression.items()}
    for t, codec in plan.compression.items():  # the plan's own fidelity figure stands; evaluate needs one
        fid.setdefault(t, {}).setdefault(codec, 1.0)
    return evaluate(graph, cluster, [(q.server, q.nodes) for q in plan.parts], plan.compression, fid, cm=cm)


def repredict(table: PlanTable, graph: CostGraph, cluster: Cluster) -> list[str]:
    """Re-evaluate every plan of the table on the cluster as it is now (speeds, loads, links); plans that use a
    server the cluster lacks keep their last prediction. Returns the ids of the plans it updated."""
    known = {s.name for s in cluster.servers}
    cm = CostModel(graph, cluster)
    updated = []
    for p in table.plans:
        if not p.servers <= known:
            continue
        pred = predict_plan(table, graph, cluster, p, cm)
        p.latency, p.energy, p.bottleneck = pred.latency, pred.energy, pred.bottleneck
        p.device_compute, p.device_radio = pred.device_compute, pred.device_radio
        updated.append(p.id)
    return updated




def parse_duration(text: str | float | None) -> float | None:
    """'50ms', '0.05s', '50' (milliseconds) -> seconds; None stays None."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower()
    try:
        if s.endswith("ms"):
            value = float(s[:-2]) / 1e3
        elif s.endswith("s"):
            value = float(s[:-1])
        else:
            value = float(s) / 1e3
    except ValueError:
        raise PlanError(f"duration {text!r} is not like 50ms, 0.05s or 50 (milliseconds)") from None
    if not math.isfinite(value) or value <= 0:
        raise PlanError(f"duration {text!r} must be positive")
    return value
