"""Turning cuts or groups of operations into parts: which nodes each part runs, what it takes and gives."""

from __future__ import annotations

import hashlib

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.manifest import Manifest, PartEntry, PartOutput, SourceModel, TensorSpec

if TYPE_CHECKING:  # the graph is built by whoever calls; this module loads without TensorFlow
    from splitinfer.splitter.graph import ModelGraph


@dataclass
class PartSpec:
    name: str
    nodes: list[str]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def split_id_of(source_hash: str, parts: Sequence[PartSpec]) -> str:
    """A split's id: the source model's hash and which operations each part runs."""
    h = hashlib.sha256(source_hash.encode())
    for p in parts:
        h.update(("|".join(p.nodes) + "#").encode())
    return h.hexdigest()[:16]


def split_manifest(graph, parts: Sequence[PartSpec], files: Mapping[str, dict], source: SourceModel,
                   split_id: str) -> Manifest:
    """The manifest of a split, whatever the model's framework: each part's tensors (its outputs with the parts
    that consume them and whether they are final), its operations and `files[part name]` (the PartEntry fields of
    its files), the model's inputs and outputs and `source` (a SourceModel)."""
    consumers: dict[str, list[str]] = {}
    for p in parts:
        for t in p.inputs:
            consumers.setdefault(t, []).append(p.name)
    finals = set(graph.outputs)
    entries = [
        PartEntry(
            name=p.name,
            inputs=[TensorSpec(**graph.tensors[t].to_json()) for t in p.inputs],
            outputs=[PartOutput(**graph.tensors[t].to_json(), consumers=consumers.get(t, []), final=t in finals)
                     for t in p.outputs],
            operations=list(p.nodes),
            **files[p.name],
        )
        for p in parts
    ]
    return Manifest(
        split_id=split_id, source=source,
        inputs=[TensorSpec(**graph.tensors[t].to_json()) for t in graph.inputs],
        outputs=[TensorSpec(**graph.tensors[t].to_json()) for t in graph.outputs],
        output_keys=graph.output_keys, parts=entries)


def _finish(graph: ModelGraph, groups: list[list[str]]) -> list[PartSpec]:
    """Name the groups part0..partN and fill their inputs/outputs from the graph's edges."""
    parts = [
        PartSpec(f"part{i}", list(nodes), inputs, outputs)
        for i, (nodes, (inputs, outputs)) in enumerate(zip(groups, graph.dag.boundaries(groups)))
    ]
    # A model input that is also a final output is handed on by the first part taking it (part0 if none does),
    # so every final output comes out of some part.
    for t in dict.fromkeys(graph.outputs):
        if graph.nodes[graph.tensors[t].producer].is_input and parts:
            part = next((p for p in parts if t in p.inputs), parts[0])
            if t not in part.inputs:
                part.inputs.append(t)
            if t not in part.outputs:
                part.outputs.append(t)
    return parts


def split_by_groups(graph: ModelGraph, groups: Mapping[str, Hashable]) -> list[PartSpec]:
    """Any partition of the compute nodes whose quotient graph is acyclic; parts come in topological order."""
    compute = graph.compute_nodes
    missing = [n for n in compute if n not in groups]
    if missing:
        raise SplitError(f"partition leaves {len(missing)} operation(s) unassigned, first {missing[0]!r}")
    unknown = [n for n in groups if n not in graph.nodes or graph.nodes[n].is_input]
    if unknown:
        raise SplitError(f"partition names unknown operation {unknown[0]!r}")
    members: dict[Hashable, list[str]] = {}
    for n in compute:
        members.setdefault(groups[n], []).append(n)
    edges: dict[Hashable, set] = {g: set() for g in members}
    indeg = {g: 0 for g in members}
    for n in compute:
        for t in graph.nodes[n].unique_inputs:
            p = graph.tensors[t].producer
            if graph.nodes[p].is_input:
                continue
            a, b = groups[p], groups[n]
            if a != b and b not in edges[a]:
                edges[a].add(b)
                indeg[b] += 1
    first = {g: graph.index[m[0]] for g, m in members.items()}
    ready = sorted((g for g, d in indeg.items() if d == 0), key=first.get)
    order = []
    while ready:
        g = ready.pop(0)
        order.append(g)
        for h in edges[g]:
            indeg[h] -= 1
            if indeg[h] == 0:
                ready.append(h)
        ready.sort(key=first.get)
    if len(order) != len(members):
        stuck = sorted((g for g in members if g not in order), key=first.get)
        raise SplitError(f"partition is cyclic: groups {[str(g) for g in stuck[:4]]} depend on each other")
    return _finish(graph, [members[g] for g in order])


def split_at_cuts(graph: ModelGraph, frontiers: Sequence[str | Sequence[str]]) -> list[PartSpec]:
    """Cut after each frontier: a tensor, or a set of tensors (a list, or names joined by '+') that together
    are all that is live there.

    The part before a frontier is its tensors' producers with every ancestor; a frontier that does not
    account for every tensor crossing that boundary does not separate the graph and is refused.
    """
    prefixes: list[tuple[int, list[str]]] = []
    for frontier in frontiers:
        tensors = [t.strip() for t in frontier.split("+")] if isinstance(frontier, str) else list(frontier)
        if not tensors:
            raise SplitError("empty cut")
        label = "+".join(tensors)
        infos = [graph.tensor(t) for t in tensors]
        if all(graph.nodes[info.producer].is_input for info in infos):
            # A model input may be live across a cut (joined with +), but cannot be the cut on its own.
            raise SplitError(f"tensor {tensors[0]!r} is a model input; a cut must come after an operation")
        prefix = graph.dag.prefix(tensors)
        crossing = graph.crossing(prefix)
        extra = [t for t in crossing if t not in tensors]
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise SplitError(
                f"cut at {label} does not separate the graph: {', '.join(extra[:3])}{more} also cross it "
                f"(see `splitinfer cuts` for valid cut points, or cut at {'+'.join([*tensors, *extra])})"
            )
        if prefix == graph.dag.full:  # the prefix holds every input node, so any rest would be operations
            raise SplitError(f"cut at {label} leaves nothing to run after it")
        prefixes.append((prefix, tensors))
    prefixes.sort(key=lambda p: bin(p[0]).count("1"))
    for (a, ta), (b, tb) in zip(prefixes, prefixes[1:]):
        if a == b:
            raise SplitError(f"cuts {'+'.join(ta)} and {'+'.join(tb)} fall at the same place")
        if a & ~b:
            raise SplitError(
                f"cuts {'+'.join(ta)} and {'+'.join(tb)} lie on parallel branches; cut them together as "
                f"{'+'.join([*ta, *tb])}"
            )
    return _finish(graph, graph.dag.parts_between([p for p, _ in prefixes]))


BALANCE_SLACK = 0.05  # a part may cost this much more than in the best balance, if fewer bytes cross the cuts


def balanced_cuts(graph: ModelGraph, costs: Mapping[str, float], n_parts: int, slack: float = BALANCE_SLACK,
                  batch: int = 1) -> list[str]:
    """Choose n_parts-1 single-tensor cut points: the most expensive part within `slack` of the best possible
    balance (exact DP), and among such cuts the fewest bytes handed over (a second exact DP). Why: every byte at
    a cut is a broker hop's per-byte cost, and balance-only picks can land on a wide tensor next to a narrow one
    of almost the same balance (MobileNetV3Large: a 750 kB expansion instead of the 125 kB bottleneck)."""
    if n_parts < 1:
        raise SplitError("--parts must be at least 1")
    points = graph.cut_points()
    if n_parts - 1 > len(points):
        raise SplitError(
            f"cannot make {n_parts} parts: {graph.name} has only {len(points)} valid cut point(s), "
            f"so at most {len(points) + 1} parts"
        )
    if n_parts == 1:
        return []
    weight = [float(costs.get(n, 0.0)) for n in graph.order]
    total = sum(weight)

    def prefix_cost(t: str) -> float:
        mask = graph.upstream(t)
        return sum(w for i, w in enumerate(weight) if mask >> i & 1)

    cum = [0.0] + [prefix_cost(t) for t in points] + [total]
    size = [0.0] + [float(graph.tensors[t].nbytes(batch)) for t in points] + [0.0]
    chosen = _balanced_boundaries(cum, size, n_parts, slack)
    return sorted((points[j - 1] for j in chosen), key=lambda t: graph.index[graph.tensors[t].producer])


def balanced_split(graph: ModelGraph, costs: Mapping[str, float], n_parts: int, slack: float = BALANCE_SLACK,
                   batch: int = 1) -> list[PartSpec]:
    """`--parts N` for any graph: at single-tensor cut points when the graph has enough of them (balanced_cuts),
    otherwise at N-1 frontiers of one or several tensors: the cuts after prefixes of the topological order (each
    such prefix holds every ancestor of what it holds, so the tensors crossing it are exactly what the part after
    needs), chosen by the same two DPs (balance within `slack`, then the fewest bytes crossing). SplitError only
    when the graph has fewer than N operations."""
    if n_parts < 1:
        raise SplitError("--parts must be at least 1")
    if n_parts - 1 <= len(graph.cut_points()):
        return split_at_cuts(graph, balanced_cuts(graph, costs, n_parts, slack, batch))
    compute = [n for n in graph.order if not graph.nodes[n].is_input]
    if n_parts > len(compute):
        raise SplitError(f"cannot make {n_parts} parts: {graph.name} has only {len(compute)} operation(s)")
    weight = [float(costs.get(n, 0.0)) for n in compute]
    cum, size, mask = [0.0], [0.0], graph.dag.sources
    for i, n in enumerate(compute[:-1]):
        mask |= 1 << graph.index[n]
        cum.append(cum[-1] + weight[i])
        size.append(float(sum(graph.tensors[t].nbytes(batch) for t in graph.crossing(mask))))
    cum.append(sum(weight))
    size.append(0.0)
    bounds = [0, *sorted(_balanced_boundaries(cum, size, n_parts, slack)), len(compute)]
    groups = {n: k for k, (a, b) in enumerate(zip(bounds, bounds[1:])) for n in compute[a:b]}
    return split_by_groups(graph, groups)


def _balanced_boundaries(cum: Sequence[float], size: Sequence[float], k: int, slack: float) -> list[int]:
    """Boundaries 0 < j1 < ... < j(k-1) < m-1 over candidate positions (cum[j]: cost before position j, size[j]:
    bytes crossing there): the most expensive part within `slack` of the best balance, then the fewest bytes."""
    m = len(cum)

    def solve(objective, limit: float) -> list[int] | None:
        """Boundaries (k parts, each costing <= limit) minimising `objective(peak, bytes)` over (the most
        expensive part, the bytes at the chosen boundaries); None when no such boundaries exist."""
        inf = (float("inf"), float("inf"))
        best = [[inf] * (k + 1) for _ in range(m)]  # (peak, bytes) of the best way to cover up to j with c parts
        back = [[-1] * (k + 1) for _ in range(m)]
        best[0][0] = (0.0, 0.0)
        for j in range(1, m):
            for c in range(1, k + 1):
                for i in range(c - 1, j):
                    if best[i][c - 1] == inf or cum[j] - cum[i] > limit:
                        continue
                    v = (max(best[i][c - 1][0], cum[j] - cum[i]), best[i][c - 1][1] + size[j])
                    if back[j][c] < 0 or objective(*v) < objective(*best[j][c]):
                        best[j][c], back[j][c] = v, i
        if back[m - 1][k] < 0:
            return None
        chosen, j = [], m - 1
        for c in range(k, 0, -1):
            j = back[j][c]
            if j > 0:
                chosen.append(j)
        return chosen

    balanced = solve(lambda peak, nbytes: (peak, nbytes), float("inf"))
    bounds = [0, *sorted(balanced), m - 1]
    peak = max(cum[b] - cum[a] for a, b in zip(bounds, bounds[1:]))
    return solve(lambda peak, nbytes: (nbytes, peak), peak * (1.0 + max(0.0, slack)) + 1e-9 * abs(peak)) or balanced


def cut_point_rows(graph: ModelGraph, batch: int = 1) -> list[dict]:
    """Every single-tensor cut point: its tensor, the position of its producer, shape and dtype, the bytes live
    there at `batch` (what `splitinfer cuts` lists and plots)."""
    rows = []
    for t in graph.cut_points():
        info = graph.tensors[t]
        rows.append(
            {
                "tensor": t,
                "position": graph.index[info.producer],
                "shape": [batch if d is None else d for d in info.shape],
                "dtype": info.dtype,
                "bytes": info.nbytes(batch),
            }
        )
    return rows
