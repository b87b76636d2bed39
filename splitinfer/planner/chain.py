"""Exact dynamic programming over the valid cut points (the graph as a chain of segments).

A chain plan gives each segment between consecutive cut points a server; consecutive segments on one server form
one part. A server may host several parts (the device can run the first and the last), and its memory limit
applies to the weights of all of them. At a cut whose tensor crosses servers the planner may send it compressed
(float16 or int8) when a fidelity figure for that choice is given.

Latency, device energy and fidelity are all additive (log-additive for fidelity) along the chain, because on a
chain everything runs one after the other, so device idle time = latency - device compute - device radio >= 0 and
energy = (compute_w - idle_w) x compute + (radio_w - idle_w) x radio + idle_w x latency. The DP therefore keeps,
for every (segment, server), the Pareto set of labels over (latency, energy, fidelity, weights placed on each
memory-limited server); a label is dropped only when another one is no worse in every one of these. This is
exact: minimum latency, minimum energy under a latency budget, and the whole Pareto front over (latency, energy,
fidelity) come from the final labels. Dimensions a request does not need (energy for a latency objective,
fidelity without compression options) are held constant so the label sets stay small; when only latency and
energy remain, the DP runs on numpy arrays, and servers another server at the same site stands in for are left
out (costmodel.dominated_servers), so thousands of operations over a hundred servers plan in a fraction of a
second.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from splitinfer.planner.costmodel import CostModel, dominated_servers
from splitinfer.planner.model import CODEC_FACTOR, Cluster, CostGraph, PlanError
from splitinfer.planner.plan import Plan, dominates, make_plan

Compression = Mapping[str, Mapping[str, float]]  # tensor -> {codec: fidelity in (0, 1]}


@dataclass(slots=True)
class _Label:
    latency: float
    energy: float
    fidelity: float
    memory: tuple
    parent: _Label | None
    server: int
    codec: str | None  # codec used for the tensor arriving at this segment


def _pareto(labels: list[_Label]) -> list[_Label]:
    """Labels no other label beats on latency, energy, fidelity and every tracked memory (ties: one kept)."""
    if len(labels) < 2:
        return labels
    labels.sort(key=lambda l: (l.latency, l.energy, -l.fidelity, l.memory))
    rest = [(l.energy, -l.fidelity, *l.memory) for l in labels]  # all "smaller is better"; latency is sorted
    varying = [i for i, col in enumerate(zip(*rest)) if min(col) != max(col)]
    if len(varying) <= 1:  # latency and at most one other criterion: a staircase, O(n log n)
        if not varying:
            return labels[:1]
        i = varying[0]
        kept, best = [], math.inf
        for lab, r in zip(labels, rest):
            if r[i] < best:
                kept.append(lab)
                best = r[i]
        return kept
    if len(varying) == 2:  # latency and two others (energy and fidelity, say): a 2-D staircase, O(n log n)
        i, j = varying
        xs: list[float] = []  # the kept labels' criterion i, ascending; criterion j strictly descending with it
        ys: list[float] = []
        kept = []
        for lab, r in zip(labels, rest):
            x, y = r[i], r[j]
            k = bisect.bisect_right(xs, x)
            if k and ys[k - 1] <= y:  # a kept label (no slower: sorted) is no worse in both: dominated
                continue
            kept.append(lab)
            end = k
            while end < len(xs) and ys[end] >= y:  # the staircase points this one now dominates
                end += 1
            xs[k:end] = [x]
            ys[k:end] = [y]
        return kept
    kept, kept_rest = [], []
    for lab, r in zip(labels, rest):
        r = tuple(r[i] for i in varying)
        # every kept label is no slower (sorted), so it dominates when no worse in every other criterion
        if not any(all(a <= b for a, b in zip(k, r)) for k in kept_rest):
            kept.append(lab)
            kept_rest.append(r)
    return kept


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f} MB"


def chain_labels(
    graph: CostGraph,
    cluster: Cluster,
    *,
    energy: bool = True,
    compression: Compression | None = None,
    max_latency: float | None = None,
    min_fidelity: float | None = None,
    exclude: Sequence[str] = (),
    prune_dominated: bool = True,
):
    """Run the DP; returns (segments, cost model, final labels) where each final label includes the hop back to
    the client. The DP runs on the servers `dominated_servers` leaves (exact; `prune_dominated=False` runs it on
    every server, for checking that). It first runs without tracking memory (each segment alone must still fit
    its server), then again tracking the weights placed on the servers whose memory a final label's plan
    overfills, until every final plan fits: each run solves a relaxation of the real problem, so a front that
    fits is the exact front, and only the servers whose memory binds add a dimension to the labels."""
    skip = [*exclude, *dominated_servers(graph, cluster, exclude)] if prune_dominated else list(exclude)
    cm = CostModel(graph, cluster, skip)
    args = (graph, cm, energy, compression, max_latency, min_fidelity)
    tracked: set[int] = set()
    while True:
        segs, final = _labels(*args, tracked=tracked)
        over = {s for lab in final for s in _overfilled(graph, cm, segs, lab)}
        if not over:
            return segs, cm, final
        tracked |= over


def _overfilled(graph: CostGraph, cm: CostModel, segs, final: _Label) -> list[int]:
    """The servers whose memory the final label's plan overfills."""
    placed: dict[int, int] = {}
    lab, k = final.parent, len(segs) - 1
    while lab is not None:
        placed[lab.server] = placed.get(lab.server, 0) + sum(graph.nodes[n].param_bytes for n in segs[k][0])
        lab, k = lab.parent, k - 1
    return [s for s, v in placed.items() if cm.servers[s].memory is not None and v > cm.servers[s].memory]


def _labels(graph: CostGraph, cm: CostModel, energy: bool, compression: Compression | None,
            max_latency: float | None, min_fidelity: float | None, *, tracked: set[int]):
    """The DP itself, tracking the memory of the `tracked` servers: (segments, final labels)."""
    segs = graph.segments()
    m, S = len(segs), len(cm.servers)
    seg_cost = [sum(graph.nodes[n].cost for n in nodes) for nodes, _ in segs]
    seg_params = [sum(graph.nodes[n].param_bytes for n in nodes) for nodes, _ in segs]
    total_params = sum(seg_params)
    # only a server that cannot take every weight of the model needs its memory tracked
    limited = [s for s in range(S) if cm.servers[s].memory is not None and cm.servers[s].memory < total_params
               and s in tracked]
    slot = {s: i for i, s in enumerate(limited)}
    cap = [cm.servers[s].memory for s in limited]
    biggest = max((math.inf if s.memory is None else s.memory) for s in cm.servers)
    for k, p in enumerate(seg_params):
        if p > biggest:
            where = f"before cut {segs[k][1]}" if segs[k][1] else "after the last cut"
            raise PlanError(
                f"no server can hold the operations {where} ({segs[k][0][0]}..{segs[k][0][-1]}): "
                f"{_mb(p)} of weights, largest memory {_mb(biggest)}"
            )
    if sum(math.inf if srv.memory is None else srv.memory for srv in cm.servers) < total_params:
        return segs, []  # all the servers together cannot hold the weights

    def fits(params: int, s: int) -> bool:
        return cm.servers[s].memory is None or params <= cm.servers[s].memory

    power = cm.power if energy else None
    wc = (power.compute_w - power.idle_w) if power else 0.0
    wr = (power.radio_w - power.idle_w) if power else 0.0
    wi = power.idle_w if power else 0.0
    # a segment holding device-only operations runs at the client's site only (math.inf elsewhere: never chosen)
    # and a segment too big for a server's memory never runs there
    comp = [[cm.compute(seg_cost[k], s) if cm.may_run(segs[k][0], s) and fits(seg_params[k], s) else math.inf
             for s in range(S)] for k in range(m)]
    in_sizes = [graph.tensors[t].nbytes for t in graph.inputs]
    out_sizes = [graph.tensors[t].nbytes for t in graph.outputs if graph.tensors[t].producer is not None]
    budget = math.inf if max_latency is None else max_latency
    min_fid = 0.0 if min_fidelity is None else min_fidelity
    choices = any(compression.get(t) and graph.tensors[t].compressible for _, t in segs[:-1]) if compression else False
    if not limited and not choices:  # labels are (latency, energy): the DP on arrays
        return segs, _array_labels(graph, cm, segs, comp, in_sizes, out_sizes, budget, power)

    # suffix[k]: weights of segments k.. still to place. A label remembers, per memory-limited server, the weights
    # placed there, raised to at least cap - suffix[k + 1]: while at least that much room is left every future
    # fits, so labels that differ only below that level are equivalent (keeps label sets small when memory
    # does not bind; still exact)
    suffix = [0] * (m + 1)
    for k in range(m - 1, -1, -1):
        suffix[k] = suffix[k + 1] + seg_params[k]

    def prune(labels: list[_Label], k: int) -> list[_Label]:
        if not labels:
            return labels
        if limited:
            floor = suffix[k + 1]
            if untracked_room < floor:  # the weights still to place must fit the room left somewhere
                labels = [lab for lab in labels if untracked_room + sum(c - v for v, c in zip(lab.memory, cap)) >= floor]
            for lab in labels:
                lab.memory = tuple(max(v, c - floor) for v, c in zip(lab.memory, cap))
        return _pareto(labels)

    def step(dl: float, dc: float, dr: float) -> float:
        return wc * dc + wr * dr + wi * dl

    untracked_room = sum(math.inf if srv.memory is None else srv.memory
                         for i, srv in enumerate(cm.servers) if i not in slot)
    zero_mem = tuple(0 for _ in limited)
    layer: list[list[_Label]] = [[] for _ in range(S)]
    for s in range(S):
        mem = zero_mem
        if s in slot:
            if seg_params[0] > cap[slot[s]]:
                continue
            i = slot[s]
            mem = mem[:i] + (seg_params[0],) + mem[i + 1 :]
        hop = cm.hop(cm.client, s, in_sizes)
        if hop == math.inf or comp[0][s] == math.inf:
            continue
        dl = hop + comp[0][s]
        dr = cm.radio(cm.client, s, sum(in_sizes))
        dc = comp[0][s] if s == cm.client else 0.0
        if dl <= budget:
            layer[s] = prune([_Label(dl, step(dl, dc, dr), 1.0, mem, None, s, None)], 0)
    client = cm.client
    for k in range(1, m):
        t = segs[k - 1][1]
        info = graph.tensors[t]
        options: list[tuple[str | None, float, float]] = [(None, float(info.nbytes), 1.0)]
        if compression and info.compressible:
            for codec, fid in (compression.get(t) or {}).items():
                if codec not in CODEC_FACTOR:
                    raise PlanError(f"unknown codec {codec!r} for tensor {t!r}")
                options.append((codec, info.nbytes * CODEC_FACTOR[codec], float(fid)))
        # per option and server pair: (latency added by the hop, energy added by the hop)
        moves = [
            [
                [
                    (h, step(h, 0.0, cm.radio(a, b, nb)))
                    for b in range(S)
                    for h in [cm.hop(a, b, [nb]) if a != b and cm.reach[a][b] else math.inf]
                ]
                for a in range(S)
            ]
            for _, nb, _ in options
        ]
        ck = comp[k]
        run = [(ck[b], step(ck[b], ck[b] if b == client else 0.0, 0.0)) for b in range(S)]
        nb_params = seg_params[k]
        nxt: list[list[_Label]] = [[] for _ in range(S)]
        for s in range(S):
            for lab in layer[s]:
                for s2 in range(S):
                    mem = lab.memory
                    if s2 in slot:
                        i = slot[s2]
                        v = mem[i] + nb_params
                        if v > cap[i]:
                            continue
                        mem = mem[:i] + (v,) + mem[i + 1 :]
                    dl_run, de_run = run[s2]
                    if dl_run == math.inf:
                        continue
                    if s2 == s:
                        if lab.latency + dl_run <= budget:
                            nxt[s2].append(
                                _Label(lab.latency + dl_run, lab.energy + de_run, lab.fidelity, mem, lab, s2, None)
                            )
                        continue
                    for o, (codec, _, fid) in enumerate(options):
                        h, de = moves[o][s][s2]
                        L = lab.latency + h + dl_run
                        if L > budget:
                            continue
                        f = lab.fidelity * fid
                        if f < min_fid:
                            continue
                        nxt[s2].append(_Label(L, lab.energy + de + de_run, f, mem, lab, s2, codec))
        layer = [prune(labs, k) for labs in nxt]
    final: list[_Label] = []
    for s in range(S):
        hop = cm.hop(s, cm.client, out_sizes)
        if hop == math.inf:
            continue
        dr = cm.radio(s, cm.client, sum(out_sizes))
        for lab in layer[s]:
            if lab.latency + hop <= budget and lab.fidelity >= min_fid:
                final.append(
                    _Label(lab.latency + hop, lab.energy + step(hop, 0.0, dr), lab.fidelity, lab.memory, lab, s, None)
                )
    return segs, _pareto(final)


def _array_labels(graph: CostGraph, cm: CostModel, segs, comp, in_sizes, out_sizes, budget: float,
                  power) -> list[_Label]:
    """The DP when a label is (latency, device energy), no memory tracked and no compression to choose, on numpy
    arrays: a layer is every label's latency, energy, server and parent; a step prices every label's move to
    every server at once and keeps, per server, the staircase over (latency, energy) (without energy: the fastest
    label), as _pareto would. Same labels as the label DP, ties included; the final ones become _Labels."""
    S, cl = len(cm.servers), cm.client
    wc = (power.compute_w - power.idle_w) if power else 0.0
    wr = (power.radio_w - power.idle_w) if power else 0.0
    wi = power.idle_w if power else 0.0
    comp_a = np.array(comp, dtype=float)
    bw = np.array(cm.bw, dtype=float)
    servers = np.arange(S)

    def within(lat):
        return np.isfinite(lat) & (lat <= budget)

    def staircases(lat, en, group, parent):
        """Per group (the server a label arrives at), the labels no other in it beats on both latency and energy,
        in (group, latency, energy) order; ties: the first. One sort for all groups: energies become their ranks,
        shifted down by group so that a running minimum starts afresh at each group (integers: exact)."""
        order = np.lexsort((en, lat, group))
        rank = np.unique(en, return_inverse=True)[1].reshape(-1)
        key = rank[order] - group[order].astype(np.int64) * (len(en) + 1)
        keep = np.ones(len(order), dtype=bool)
        keep[1:] = key[1:] < np.minimum.accumulate(key)[:-1]
        sel = order[keep]
        return lat[sel], en[sel], group[sel], parent[sel]

    with np.errstate(divide="ignore", invalid="ignore"):
        hop0 = np.array([cm.hop(cl, s, in_sizes) for s in range(S)], dtype=float)
        radio0 = np.array([cm.radio(cl, s, sum(in_sizes)) for s in range(S)], dtype=float)
        lat = hop0 + comp_a[0]
        en = wc * np.where(servers == cl, comp_a[0], 0.0) + wr * radio0 + wi * lat
        ok = np.flatnonzero(within(lat))
        layers = [(lat[ok], en[ok], servers[ok], np.full(len(ok), -1))]
        for k in range(1, len(segs)):
            lat, en, srv, _ = layers[-1]
            if not len(lat):
                layers.append(layers[-1])  # nothing reached this far within the budget: nothing goes on
                continue
            nb = float(graph.tensors[segs[k - 1][1]].nbytes)
            hop = cm.hop_matrix(nb)
            run = comp_a[k]
            L = lat[:, None] + hop[srv, :] + run[None, :]
            if power is None:
                best = L.argmin(axis=0)
                new = L[best, servers]
                ok = np.flatnonzero(within(new))
                layers.append((new[ok], np.zeros(len(ok)), servers[ok], best[ok]))
                continue
            radio = np.zeros((S, S))  # the bytes' time on the air, when the client sends or receives them
            radio[cl, :], radio[:, cl] = nb / bw[cl, :], nb / bw[:, cl]
            radio[cl, cl] = 0.0
            erun = wi * run + wc * np.where(servers == cl, run, 0.0)
            E = en[:, None] + wr * radio[srv, :] + wi * hop[srv, :] + erun[None, :]
            E[~within(L)] = np.inf
            # a label slower than the least-energy label at its server, and using no less energy, is beaten by it
            least = E.argmin(axis=0)
            rows, cols = np.nonzero(np.isfinite(E) & (L <= L[least, servers][None, :]))
            layers.append(staircases(L[rows, cols], E[rows, cols], cols, rows))
        lat, en, srv, _ = layers[-1]
        back = np.array([cm.hop(s, cl, out_sizes) for s in range(S)], dtype=float)
        radio_back = np.array([cm.radio(s, cl, sum(out_sizes)) for s in range(S)], dtype=float)
        total = lat + back[srv]
        energy = en + wr * radio_back[srv] + wi * back[srv]
    ok = np.flatnonzero(within(total))
    ends = staircases(total[ok], energy[ok], np.zeros(len(ok), dtype=np.int64), ok)[3]
    made: dict[tuple[int, int], _Label] = {}

    def label(k: int, i: int) -> _Label:
        path = []  # back to the first segment, or to a label already made
        while k >= 0 and (k, i) not in made:
            path.append((k, i))
            i = int(layers[k][3][i])
            k -= 1
        for k, i in reversed(path):
            lat, en, srv, parent = layers[k]
            made[k, i] = _Label(float(lat[i]), float(en[i]), 1.0, (), made[k - 1, int(parent[i])] if k else None,
                                int(srv[i]), None)
        return made[path[0]] if path else made[k, i]

    last = len(layers) - 1
    return [_Label(float(total[i]), float(energy[i]), 1.0, (), label(last, int(i)), int(srv[i]), None) for i in ends]


def _to_plan(graph, cluster, segs, cm: CostModel, final: _Label, compression: Compression | None, source: str) -> Plan:
    path: list[_Label] = []
    lab = final.parent  # the final label only adds the hop back to the client
    while lab is not None:
        path.append(lab)
        lab = lab.parent
    path.reverse()
    parts: list[tuple[str, list[str]]] = []
    codecs: dict[str, str] = {}
    for k, lab in enumerate(path):
        nodes = segs[k][0]
        name = cm.names[lab.server]
        if lab.codec:
            codecs[segs[k - 1][1]] = lab.codec
        if parts and parts[-1][0] == name:
            parts[-1][1].extend(nodes)
        else:
            parts.append((name, list(nodes)))
    return make_plan(graph, cluster, parts, codecs, compression, source=source, cm=cm)


def _why_empty(graph, cluster, compression, max_latency, min_fidelity, exclude) -> PlanError:
    """Explain why no chain plan exists: SLA, fidelity, or memory/links."""
    _, _, free = chain_labels(graph, cluster, energy=False, compression=compression, exclude=exclude)
    if not free:
        return PlanError(
            "no placement fits: the servers' memory limits or missing links rule out every plan "
            f"(total weights {_mb(graph.total_params)})"
        )
    if min_fidelity is not None:
        best_f = max(l.fidelity for l in free)
        if best_f < min_fidelity:
            return PlanError(f"no plan reaches fidelity {min_fidelity:g}: best achievable is {best_f:g}")
        _, _, ok = chain_labels(
            graph, cluster, energy=False, compression=compression, min_fidelity=min_fidelity, exclude=exclude
        )
        best = min(l.latency for l in ok)
        return PlanError(
            f"latency budget {max_latency * 1e3:.3g} ms is unreachable: best achievable is {best * 1e3:.3g} ms "
            f"at fidelity >= {min_fidelity:g}"
        )
    best = min(l.latency for l in free)
    return PlanError(f"latency budget {max_latency * 1e3:.3g} ms is unreachable: best achievable is {best * 1e3:.3g} ms")


def plan_chain(
    graph: CostGraph,
    cluster: Cluster,
    objective: str = "latency",
    *,
    max_latency: float | None = None,
    min_fidelity: float | None = None,
    compression: Compression | None = None,
    exclude: Sequence[str] = (),
) -> Plan:
    """The exact best chain plan: objective "latency" (minimise end-to-end latency) or "energy" (minimise device
    energy, within max_latency when given). Ties go to the lower energy resp. latency."""
    if objective not in ("latency", "energy"):
        raise PlanError(f"chain objective must be 'latency' or 'energy', not {objective!r}")
    segs, cm, final = chain_labels(
        graph,
        cluster,
        energy=objective == "energy",
        compression=compression,
        max_latency=max_latency,
        min_fidelity=min_fidelity,
        exclude=exclude,
    )
    if not final:
        raise _why_empty(graph, cluster, compression, max_latency, min_fidelity, exclude)
    key = (lambda l: (l.energy, l.latency)) if objective == "energy" else (lambda l: (l.latency, l.energy))
    best = min(final, key=key)
    return _to_plan(graph, cluster, segs, cm, best, compression, f"chain-dp/{objective}")


def chain_pareto(
    graph: CostGraph,
    cluster: Cluster,
    *,
    compression: Compression | None = None,
    max_latency: float | None = None,
    exclude: Sequence[str] = (),
) -> list[Plan]:
    """Every chain plan on the Pareto front of (latency, device energy, fidelity), fastest first."""
    segs, cm, final = chain_labels(
        graph, cluster, energy=True, compression=compression, max_latency=max_latency, exclude=exclude
    )
    if not final:
        raise _why_empty(graph, cluster, compression, max_latency, None, exclude)
    front: dict[tuple, _Label] = {}
    for lab in final:  # final labels also differ by memory use; keep one per objective point
        front.setdefault((lab.latency, lab.energy, lab.fidelity), lab)
    pts = list(front.values())
    pts = [a for a in pts if not any(dominates(b, a) for b in pts)]
    pts.sort(key=lambda l: (l.latency, l.energy))
    return [_to_plan(graph, cluster, segs, cm, lab, compression, "chain-dp/pareto") for lab in pts]
