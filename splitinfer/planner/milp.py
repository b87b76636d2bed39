"""Integer programs (scipy.optimize.milp / HiGHS) for DAG partitions across several servers.

Decision: x[v,s] = 1 when operation v runs on server s. Tensor t produced on a is needed on b when one of its
consumers runs on b (w[t,b]); it crosses a -> b when x[u,a] and w[t,b] (y[t,a,b] >= x[u,a] + w[t,b] - 1).

Latency / energy objective: one part per server: every operation a server runs forms one part, which starts when
all its inputs have arrived and then runs its whole compute (the runtime's join semantics). With start times S_s:
    S_b >= S_a + compute_a + rtt_ab + sum_t y[t,a,b] (bytes_t / bw_ab + broker_t)     whenever anything goes a -> b
    S_b >= rtt_cb + sum_t w[t,b] (...)                                               model inputs from the client c
    L   >= S_a + compute_a [+ rtt_ac + sum over outputs produced on a (...)]           results back to the client
(big-M constraints switched by q[a,b] >= y[t,a,b]). Minimising L gives exactly the critical path over the parts
(the same as costmodel.evaluate), i.e. a makespan in which parallel branches on different servers overlap and
operations on one server run one after another as one part. Because every hop costs > 0, a cyclic dependency
between servers is infeasible, so the parts are always in a valid order. Device energy adds
idle >= L - compute_client - radio_client, idle >= 0, and minimises compute_w x compute + radio_w x radio +
idle_w x idle, with L <= max_latency when given.

Throughput objective: minimise T >= each server's total compute and T >= each directed site pair's bytes /
bandwidth per request (the pipelined bottleneck); a server may then host several parts (the plan groups them by
level so they stay in dependency order). With max_latency the latency constraints above are added too.

A DAG with more operations than `max_nodes` is first coarsened into contiguous blocks of the topological order
(which keeps it acyclic); the program is then exact for placing those blocks, not for single operations.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from splitinfer.planner.costmodel import CostModel, dominated_servers, evaluate
from splitinfer.planner.model import Cluster, CostGraph, CostNode, PlanError, check_objective
from splitinfer.planner.plan import Plan, make_plan, parts_from_assignment


class _Program:
    def __init__(self):
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def var(self, lb=0.0, ub=1.0, integer=False) -> int:
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(1 if integer else 0)
        return len(self.lb) - 1

    def row(self, terms, lo=-math.inf, hi=math.inf) -> None:
        r = len(self.lo)
        for j, v in terms:
            if v != 0.0:
                self.rows.append(r)
                self.cols.append(j)
                self.vals.append(v)
        self.lo.append(lo)
        self.hi.append(hi)

    def solve(self, objective: dict[int, float], time_limit: float | None):
        from scipy.optimize import Bounds, LinearConstraint, milp  # lazy: ~0.5 s to import, only when solving
        from scipy.sparse import csr_array  # lazy: with scipy.optimize

        n = len(self.lb)
        c = np.zeros(n)
        for j, v in objective.items():
            c[j] += v
        cons = []
        if self.lo:
            A = csr_array((self.vals, (self.rows, self.cols)), shape=(len(self.lo), n))
            cons.append(LinearConstraint(A, self.lo, self.hi))
        options = {"disp": False, "mip_rel_gap": 1e-9}
        if time_limit is not None:
            options["time_limit"] = time_limit
        with _quiet_stdout():  # HiGHS prints stray debug lines to fd 1 even with disp=False
            return milp(c, constraints=cons, integrality=np.array(self.integer), bounds=Bounds(self.lb, self.ub),
                        options=options)


@contextlib.contextmanager
def _quiet_stdout():
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured or replaced stdout: nothing to silence at fd level
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def coarsen(graph: CostGraph, max_nodes: int) -> tuple[CostGraph, dict[str, list[str]]]:
    """Merge contiguous runs of the topological order into at most max_nodes blocks of similar cost."""
    n = len(graph.order)
    if n <= max_nodes:
        return graph, {v: [v] for v in graph.order}
    total = graph.total_cost or 1.0
    blocks: list[list[str]] = [[]]
    acc = 0.0
    for i, v in enumerate(graph.order):
        left = n - i  # operations still to place, including v
        if blocks[-1] and (acc >= total / max_nodes or left <= max_nodes - len(blocks)) and len(blocks) < max_nodes:
            blocks.append([])
            acc = 0.0
        blocks[-1].append(v)
        acc += graph.nodes[v].cost
    nodes = [
        CostNode(
            f"block{i}",
            sum(graph.nodes[v].cost for v in members),
            tuple(ins),
            tuple(outs),
            sum(graph.nodes[v].param_bytes for v in members),
        )
        for i, (members, (ins, outs)) in enumerate(zip(blocks, graph.dag.boundaries(blocks)))
    ]
    kept = {t for nd in nodes for t in (*nd.inputs, *nd.outputs)} | set(graph.inputs)
    coarse = CostGraph(
        nodes,
        {t: graph.tensors[t].nbytes for t in kept},
        graph.inputs,
        graph.outputs,
        graph.unit,
        incompressible=[t for t in kept if not graph.tensors[t].compressible],
        name=f"{graph.name}/coarse{len(blocks)}",
        device_only=[f"block{i}" for i, b in enumerate(blocks) if graph.device_only.intersection(b)],
    )
    return coarse, {f"block{i}": b for i, b in enumerate(blocks)}


MILP_MAX_SERVERS = 6  # what plan tables give the integer program: about what HiGHS solves on 8 blocks in 0.1 s


def site_candidates(graph: CostGraph, cluster: Cluster, max_servers: int, exclude: Sequence[str] = (),
                    prefer: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(kept, left out): the client and at most max_servers others: first those in `prefer` (the servers the
    chain plans use, say), then at each site its best max_servers / sites (at least one): those no other server
    there dominates for a chain plan (costmodel.dominated_servers) first, fastest first. The program has a
    crossing variable per tensor and server pair, and a placement of a few blocks uses a few servers: more
    servers mostly add equivalent choices that keep the solver from any plan within its time limit."""
    dominated = set(dominated_servers(graph, cluster, exclude))
    others = [s for s in cluster.servers if s.name not in exclude and s.name != cluster.client]
    per_site = max(1, max_servers // max(1, len({s.site for s in others})))
    preferred = set(prefer)
    others.sort(key=lambda s: (s.name not in preferred, s.name in dominated, -s.effective_speed))
    kept, at_site = [cluster.client], {}
    for s in others:
        if len(kept) > max_servers:
            break
        if s.name in preferred or at_site.get(s.site, 0) < per_site:
            kept.append(s.name)
            at_site[s.site] = at_site.get(s.site, 0) + 1
    left = [s.name for s in others if s.name not in kept]
    return kept, left


def plan_dag(
    graph: CostGraph,
    cluster: Cluster,
    objective: str = "latency",
    *,
    max_latency: float | None = None,
    exclude: Sequence[str] = (),
    max_nodes: int | None = None,
    time_limit: float | None = 30.0,
    node_cuts: bool = True,
    max_servers: int | None = None,
    prefer: Sequence[str] = (),
) -> Plan:
    """Best node-to-server assignment of a DAG by integer programming (see the module docstring for what each
    objective models). objective: "latency", "energy" (device energy, within max_latency) or "throughput".
    With `max_servers`, only that many servers besides the client take part, those in `prefer` first
    (site_candidates): exact for those."""
    check_objective(objective)
    full_graph = graph
    members = None
    if max_nodes is not None and len(graph.nodes) > max_nodes:
        graph, members = coarsen(graph, max_nodes)
    if max_servers is not None:
        exclude = [*exclude, *site_candidates(full_graph, cluster, max_servers, exclude, prefer)[1]]
    cm = CostModel(graph, cluster, exclude)
    V, S = graph.order, range(len(cm.servers))
    cl = cm.client
    P = _Program()
    x = {(v, s): P.var(integer=True) for v in V for s in S}
    for v in V:
        P.row([(x[v, s], 1.0) for s in S], 1.0, 1.0)
        for s in S:
            if not cm.may_run([v], s):  # the privacy floor: device-only operations at the client's site only
                P.ub[x[v, s]] = 0.0
        p = graph.nodes[v].param_bytes
        for s in S:
            mem = cm.servers[s].memory
            if mem is not None and p > mem:
                P.ub[x[v, s]] = 0.0
    biggest = max(math.inf if s.memory is None else s.memory for s in cm.servers)
    for v in V:
        if graph.nodes[v].param_bytes > biggest:
            raise PlanError(
                f"no server can hold operation {v!r}: {graph.nodes[v].param_bytes / 1e6:.2f} MB of weights, "
                f"largest memory {biggest / 1e6:.2f} MB"
            )
    for s in S:
        mem = cm.servers[s].memory
        if mem is not None:
            P.row([(x[v, s], float(graph.nodes[v].param_bytes)) for v in V], hi=float(mem))

    exact = objective == "energy" and cm.power is not None  # energy could profit from phantom transfers
    comp = {(v, s): cm.compute(graph.nodes[v].cost, s) for v in V for s in S}
    # w[t,s]: tensor t is needed on server s
    w: dict[tuple[str, int], int] = {}
    for t, info in graph.tensors.items():
        if not info.consumers:
            continue
        for s in S:
            if len(info.consumers) == 1:
                w[t, s] = x[info.consumers[0], s]
                continue
            j = P.var()
            w[t, s] = j
            for c in info.consumers:
                P.row([(j, 1.0), (x[c, s], -1.0)], lo=0.0)
            if exact:
                P.row([(j, 1.0)] + [(x[c, s], -1.0) for c in info.consumers], hi=0.0)
    inputs = [t for t in graph.inputs if graph.tensors[t].consumers]
    outputs = [t for t in graph.outputs if graph.tensors[t].producer is not None]
    internal = [t for t, i in graph.tensors.items() if i.producer is not None and i.consumers]
    for t in inputs:  # model inputs cannot be needed where the client cannot send
        for b in S:
            if b != cl and not cm.reach[cl][b]:
                P.row([(w[t, b], 1.0)], hi=0.0)
    for t in outputs:
        u = graph.tensors[t].producer
        for a in S:
            if a != cl and not cm.reach[a][cl]:
                P.ub[x[u, a]] = 0.0
    y: dict[tuple[str, int, int], int] = {}
    for t in internal:
        u = graph.tensors[t].producer
        for a in S:
            for b in S:
                if a == b:
                    continue
                if not cm.reach[a][b]:
                    P.row([(x[u, a], 1.0), (w[t, b], 1.0)], hi=1.0)
                    continue
                j = P.var()
                y[t, a, b] = j
                P.row([(j, 1.0), (x[u, a], -1.0), (w[t, b], -1.0)], lo=-1.0)
                if exact:
                    P.row([(j, 1.0), (x[u, a], -1.0)], hi=0.0)
                    P.row([(j, 1.0), (w[t, b], -1.0)], hi=0.0)

    def nbytes(t):
        return float(graph.tensors[t].nbytes)

    objective_terms: dict[int, float] = {}
    need_latency = objective in ("latency", "energy") or max_latency is not None
    L = None
    if need_latency:
        finite_rtt = [cm.rtt[a][b] for a in S for b in S if a != b and cm.reach[a][b]] or [0.0]
        hop_max = sum(
            max([cm.per_tensor(nbytes(t), a, b) for a in S for b in S if a != b and cm.reach[a][b]] or [0.0])
            for t in graph.tensors
        )
        M = sum(max(comp[v, s] for s in S) for v in V) + (len(cm.servers) + 1) * (max(finite_rtt) + hop_max) + 1.0
        # Every part finishes by L, so any upper bound on the optimal L is a valid (and much tighter) big-M:
        # the latency budget, or for the latency objective the best plan that runs everything on one server.
        if max_latency is not None:
            M = min(M, max_latency)
        if objective == "latency":
            for s in S:
                if not cm.may_run(V, s):
                    continue
                one = evaluate(graph, cluster, [(cm.names[s], list(V))], cm=cm)
                if one.fits_memory:
                    M = min(M, one.latency * (1 + 1e-9) + 1e-12)
        start = {s: P.var(0.0, M) for s in S}  # S_s + compute_s <= L <= M
        L = P.var(0.0, M)

        def busy(a):
            return [(x[v, a], -comp[v, a]) for v in V]

        for a in S:
            P.row([(L, 1.0), (start[a], -1.0), *busy(a)], lo=0.0)
            for b in S:
                if a == b or not cm.reach[a][b]:
                    continue
                ys = [(y[t, a, b], cm.per_tensor(nbytes(t), a, b)) for t in internal if (t, a, b) in y]
                if not ys:
                    continue
                q = P.var()
                for j, _ in ys:
                    P.row([(q, 1.0), (j, -1.0)], lo=0.0)
                P.row([(start[b], 1.0), (start[a], -1.0), *busy(a), (q, -(cm.rtt[a][b] + M)),
                       *[(j, -h) for j, h in ys]], lo=-M)
        for b in S:
            if b == cl or not inputs or not cm.reach[cl][b]:
                continue
            qi = P.var()
            for t in inputs:
                P.row([(qi, 1.0), (w[t, b], -1.0)], lo=0.0)
            P.row([(start[b], 1.0), (qi, -cm.rtt[cl][b]),
                   *[(w[t, b], -cm.per_tensor(nbytes(t), cl, b)) for t in inputs]], lo=0.0)
        for a in S:
            if a == cl or not outputs or not cm.reach[a][cl]:
                continue
            qo = P.var()
            outs = [(x[graph.tensors[t].producer, a], cm.per_tensor(nbytes(t), a, cl)) for t in outputs]
            for j, _ in outs:
                P.row([(qo, 1.0), (j, -1.0)], lo=0.0)
            P.row([(L, 1.0), (start[a], -1.0), *busy(a), (qo, -(cm.rtt[a][cl] + M)),
                   *[(j, -h) for j, h in outs]], lo=-M)

    if need_latency and node_cuts:
        # Valid inequalities that tighten the relaxation: a node-level critical path (no big-M) is a lower bound
        # on the part-level one, because an operation starts no earlier than its inputs' producers finished plus
        # the hop between them. Exact crossing indicators exist only for single-consumer tensors (y = x AND x);
        # for the others only the producer's compute is counted, which stays a valid bound.
        tv = {v: P.var(0.0, M) for v in V}
        for v in V:
            own = [(x[v, s], -comp[v, s]) for s in S]
            for t in graph.nodes[v].inputs:
                info = graph.tensors[t]
                single = len(info.consumers) == 1
                if info.producer is None:
                    if single:
                        P.row([(tv[v], 1.0), *[(w[t, b], -(cm.rtt[cl][b] + cm.per_tensor(nbytes(t), cl, b)))
                                               for b in S if b != cl and cm.reach[cl][b]]], lo=0.0)
                    continue
                u = info.producer
                terms = [(tv[v], 1.0), (tv[u], -1.0), *[(x[u, s], -comp[u, s]) for s in S]]
                if single:
                    terms += [(j, -(cm.rtt[a][b] + cm.per_tensor(nbytes(t), a, b)))
                              for (tt, a, b), j in y.items() if tt == t]
                P.row(terms, lo=0.0)
            out_hops = []
            for t in graph.nodes[v].outputs:
                if graph.tensors[t].is_output:
                    out_hops += [(x[v, a], -(cm.rtt[a][cl] + cm.per_tensor(nbytes(t), a, cl)))
                                 for a in S if a != cl and cm.reach[a][cl]]
            P.row([(L, 1.0), (tv[v], -1.0), *own, *out_hops], lo=0.0)

    if objective == "latency":
        objective_terms[L] = 1.0
    elif objective == "energy":
        if cm.power is None:
            raise PlanError(f"the client {cluster.client!r} has no power profile: energy is not defined")
        pw = cm.power
        tc = [(x[v, cl], comp[v, cl]) for v in V]
        tr: list[tuple[int, float]] = []
        for t in inputs:
            tr += [(w[t, b], cm.wire(cl, b, nbytes(t))) for b in S if b != cl and cm.reach[cl][b]]
        for (t, a, b), j in y.items():
            if cl in (a, b):
                tr.append((j, cm.wire(a, b, nbytes(t))))
        for t in outputs:
            u = graph.tensors[t].producer
            tr += [(x[u, a], cm.wire(a, cl, nbytes(t))) for a in S if a != cl and cm.reach[a][cl]]
        idle = P.var(0.0, math.inf)
        P.row([(idle, 1.0), (L, -1.0), *tc, *tr], lo=0.0)
        for j, c in tc:
            objective_terms[j] = objective_terms.get(j, 0.0) + pw.compute_w * c
        for j, c in tr:
            objective_terms[j] = objective_terms.get(j, 0.0) + pw.radio_w * c
        objective_terms[idle] = pw.idle_w
    else:
        T = P.var(0.0, math.inf)
        objective_terms[T] = 1.0
        for s in S:
            P.row([(T, 1.0), *[(x[v, s], -comp[v, s]) for v in V]], lo=0.0)
        loads: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for (t, a, b), j in y.items():
            if cm.bw[a][b] < math.inf:
                loads.setdefault(cm.site_pair[a][b], []).append((j, cm.wire(a, b, nbytes(t))))
        for t in inputs:
            for b in S:
                if b != cl and cm.reach[cl][b] and cm.bw[cl][b] < math.inf:
                    loads.setdefault(cm.site_pair[cl][b], []).append((w[t, b], cm.wire(cl, b, nbytes(t))))
        for t in outputs:
            u = graph.tensors[t].producer
            for a in S:
                if a != cl and cm.reach[a][cl] and cm.bw[a][cl] < math.inf:
                    loads.setdefault(cm.site_pair[a][cl], []).append((x[u, a], cm.wire(a, cl, nbytes(t))))
        for terms in loads.values():
            P.row([(T, 1.0), *[(j, -c) for j, c in terms]], lo=0.0)

    res = P.solve(objective_terms, time_limit)
    if res.x is None:
        raise _infeasible(full_graph, cluster, objective, max_latency, exclude, members, time_limit, res)
    assign = {v: cm.names[max(S, key=lambda s: res.x[x[v, s]])] for v in V}
    if members is not None:
        assign = {m: assign[b] for b, ms in members.items() for m in ms}
    parts = parts_from_assignment(full_graph, assign)
    tag = "" if members is None else f"/coarse{len(members)}"
    optimal = "" if res.status == 0 else "/time-limit"
    return make_plan(full_graph, cluster, parts, source=f"milp/{objective}{tag}{optimal}")


def _infeasible(graph, cluster, objective, max_latency, exclude, members, time_limit, res) -> PlanError:
    if res.status == 1:
        return PlanError(f"the integer program hit its time limit ({time_limit} s) before finding any plan")
    if max_latency is not None:
        try:
            best = plan_dag(graph, cluster, "latency", exclude=exclude,
                            max_nodes=None if members is None else len(members), time_limit=time_limit)
        except PlanError as e:
            return e
        return PlanError(
            f"latency budget {max_latency * 1e3:.3g} ms is unreachable: best achievable is {best.latency * 1e3:.3g} ms"
        )
    return PlanError("no placement fits: the servers' memory limits or missing links rule out every plan")
