"""A plan: which operations run where (parts in dependency order), what crosses between them, and its prediction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from splitinfer.planner.costmodel import CostModel, Prediction, evaluate
from splitinfer.planner.model import Cluster, CostGraph


@dataclass
class PlanPart:
    server: str
    nodes: list[str]
    runtime: str | None = None  # the runtime it runs on, when the graph has runtimes measured


@dataclass
class Plan:
    parts: list[PlanPart]
    cuts: list[str]  # tensors that cross from one part to another, in graph order
    compression: dict[str, str]  # tensor -> codec for the tensors sent compressed
    latency: float  # seconds, end to end (see costmodel)
    energy: float  # joules on the client device
    fidelity: float  # product of the compressed tensors' fidelity figures, 1.0 without compression
    bottleneck: float  # seconds per request of the busiest stage when pipelined (throughput = 1 / bottleneck)
    device_compute: float
    device_radio: float
    memory: dict[str, int]
    source: str  # which algorithm produced it
    id: str = ""
    fallback_for: list[str] = field(default_factory=list)  # kept because it is best when these servers are down
    # in a table spanning model variants: which variant runs, and its accuracy (the variant's figure x fidelity)
    variant: str = ""
    accuracy: float | None = None

    @property
    def servers(self) -> set[str]:
        return {p.server for p in self.parts}

    @property
    def throughput(self) -> float:
        return 1.0 / self.bottleneck if self.bottleneck > 0 else float("inf")

    def assignment(self) -> dict[str, str]:
        return {n: p.server for p in self.parts for n in p.nodes}

    def groups(self) -> dict[str, int]:
        """operation -> part index, for splitinfer.splitter.partition.split_by_groups (parts keep this order)."""
        return {n: i for i, p in enumerate(self.parts) for n in p.nodes}

    def key(self) -> tuple:
        return (
            tuple((p.server, tuple(sorted(p.nodes))) for p in self.parts),
            tuple(sorted(self.compression.items())),
            self.variant,
        )

    def describe(self) -> str:
        route = " -> ".join(p.server for p in self.parts)
        codec = "".join(f" [{t}:{c}]" for t, c in self.compression.items())
        return f"{self.variant + ': ' if self.variant else ''}{route}{codec}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> Plan:
        d = dict(data)
        d["parts"] = [PlanPart(**p) for p in d["parts"]]
        return cls(**d)


def dominates(a, b) -> bool:
    """Whether plan (or DP label) `a` is no worse than `b` in latency, device energy and fidelity, and better in one."""
    no_worse = a.latency <= b.latency and a.energy <= b.energy and a.fidelity >= b.fidelity
    better = a.latency < b.latency or a.energy < b.energy or a.fidelity > b.fidelity
    return no_worse and better


def unique_plans(plans: Iterable[Plan]) -> list[Plan]:
    """One plan per key (what runs where, and what is sent compressed): the first of each, in order."""
    unique: dict[tuple, Plan] = {}
    for p in plans:
        unique.setdefault(p.key(), p)
    return list(unique.values())


def make_plan(
    graph: CostGraph,
    cluster: Cluster,
    parts: Sequence[tuple[str, Sequence[str]]],
    compression: Mapping[str, str] | None = None,
    fidelity: Mapping[str, Mapping[str, float]] | None = None,
    source: str = "",
    cm: CostModel | None = None,
) -> Plan:
    """Evaluate parts [(server, operations)] with the cost model and wrap them as a Plan."""
    pred: Prediction = evaluate(graph, cluster, parts, compression, fidelity, cm=cm)
    owner = {n: i for i, (_, nodes) in enumerate(parts) for n in nodes}
    cuts = [
        t
        for t, info in graph.tensors.items()
        if info.producer is not None and any(owner[c] != owner[info.producer] for c in info.consumers)
    ]
    sent = set(cuts) | {t for t in graph.outputs}
    comp = {t: c for t, c in (compression or {}).items() if t in sent}
    return Plan(
        parts=[PlanPart(s, list(nodes), r) for (s, nodes), r in zip(parts, pred.runtimes or [None] * len(parts))],
        cuts=cuts,
        compression=comp,
        latency=pred.latency,
        energy=pred.energy,
        fidelity=pred.fidelity,
        bottleneck=pred.bottleneck,
        device_compute=pred.device_compute,
        device_radio=pred.device_radio,
        memory=pred.memory,
        source=source,
    )


def parts_from_assignment(graph: CostGraph, assignment: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """Group operations into parts: one per server when the servers' dependency graph is acyclic; otherwise
    one per (server, level), level = the number of server changes on the longest path from the inputs, which
    always gives parts in dependency order. Parts are ordered by (level, first operation)."""
    level: dict[str, int] = {}
    for n in graph.order:
        lv = 0
        for t in graph.nodes[n].inputs:
            p = graph.tensors[t].producer
            if p is not None:
                lv = max(lv, level[p] + (assignment[p] != assignment[n]))
        level[n] = lv
    # one part per server if no server is reached twice
    span: dict[str, set[int]] = {}
    for n in graph.order:
        span.setdefault(assignment[n], set()).add(level[n])
    if all(len(v) == 1 for v in span.values()):
        key = {n: (level[n], assignment[n]) for n in graph.order}
    else:
        # try one part per server: acyclic iff a topological order of the servers exists
        edges: dict[str, set[str]] = {s: set() for s in span}
        for n in graph.order:
            for t in graph.nodes[n].inputs:
                p = graph.tensors[t].producer
                if p is not None and assignment[p] != assignment[n]:
                    edges[assignment[p]].add(assignment[n])
        indeg = {s: 0 for s in span}
        for s in edges:
            for d in edges[s]:
                indeg[d] += 1
        ready = [s for s in span if indeg[s] == 0]
        topo = []
        while ready:
            s = ready.pop()
            topo.append(s)
            for d in edges[s]:
                indeg[d] -= 1
                if indeg[d] == 0:
                    ready.append(d)
        if len(topo) == len(span):
            rank = {s: i for i, s in enumerate(topo)}
            key = {n: (rank[assignment[n]], assignment[n]) for n in graph.order}
        else:
            key = {n: (level[n], assignment[n]) for n in graph.order}
    groups: dict[tuple, list[str]] = {}
    for n in graph.order:
        groups.setdefault(key[n], []).append(n)
    ordered = sorted(groups, key=lambda g: (g[0], graph.index[groups[g][0]]))
    return [(g[1], groups[g]) for g in ordered]
