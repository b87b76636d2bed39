"""Random planner instances and an independent reference cost model, shared by the planner and optimizer tests.

`Ref` writes the cost model out again straight from its definitions (no code shared with the planner), so the
planner's answers can be checked against exhaustive search."""

from __future__ import annotations

import math
import random

from splitinfer.planner import Cluster, CostGraph, CostNode, Link, PowerProfile, Server

REL = 1e-7
PER_MSG, PER_BYTE = 0.7e-3, 2.5e-3 / 1e6


# ------------------------------------------------------------------------------------------ random instances


def random_chain(rng: random.Random, m: int) -> CostGraph:
    nodes, sizes = [], {"x:0": rng.randint(10_000, 600_000)}
    prev = "x:0"
    for i in range(m):
        nodes.append(CostNode(f"op{i}", rng.uniform(1e6, 5e8), (prev,), (f"op{i}:0",), rng.randint(0, 4_000_000)))
        prev = f"op{i}:0"
        sizes[prev] = rng.randint(1_000, 800_000)
    return CostGraph(nodes, sizes, ["x:0"], [prev], name="chain")


def random_dag(rng: random.Random, n: int) -> CostGraph:
    """Each op reads one or two earlier tensors (the input included); every tensor nobody reads is an output."""
    nodes, sizes = [], {"x:0": rng.randint(10_000, 400_000)}
    avail = ["x:0"]
    for i in range(n):
        k = 1 if i == 0 or rng.random() < 0.5 else 2
        ins = tuple(dict.fromkeys(rng.sample(avail[-4:], min(k, len(avail[-4:])))))
        out = f"op{i}:0"
        nodes.append(CostNode(f"op{i}", rng.uniform(1e6, 5e8), ins, (out,), rng.randint(0, 3_000_000)))
        sizes[out] = rng.randint(1_000, 500_000)
        avail.append(out)
    read = {t for nd in nodes for t in nd.inputs}
    outputs = [nd.outputs[0] for nd in nodes if nd.outputs[0] not in read]
    return CostGraph(nodes, sizes, ["x:0"], outputs, name="dag")


def random_cluster(rng: random.Random, n_servers: int, memory: bool = True) -> Cluster:
    sites = ["device", "edge", "cloud"]
    servers = [
        Server(
            name="dev",
            site="device",
            speed=rng.uniform(1, 5),
            load=rng.uniform(0, 0.3),
            memory=rng.randint(2_000_000, 12_000_000) if memory else None,
            power=PowerProfile(compute_w=rng.uniform(2, 5), radio_w=rng.uniform(0.5, 3), idle_w=rng.uniform(0.1, 0.5)),
        )
    ]
    for i in range(1, n_servers):
        servers.append(
            Server(
                name=f"s{i}",
                site=sites[1 + (i - 1) % 2] if i < 3 else rng.choice(sites[1:]),
                speed=rng.uniform(5, 100),
                load=rng.uniform(0, 0.6),
                memory=rng.choice([None, rng.randint(3_000_000, 20_000_000)]) if memory else None,
            )
        )
    links = [
        Link(a="device", b="edge", rtt=rng.uniform(0.002, 0.03), bandwidth=rng.uniform(1e5, 2e7)),
        Link(a="device", b="cloud", rtt=rng.uniform(0.02, 0.1), bandwidth=rng.uniform(1e5, 2e7)),
        Link(a="edge", b="cloud", rtt=rng.uniform(0.005, 0.05), bandwidth=rng.uniform(1e6, 1e8)),
    ]
    if rng.random() < 0.5:
        links.append(Link(a="edge", b="edge", rtt=rng.uniform(0, 0.002), bandwidth=rng.uniform(1e7, 1e9)))
    return Cluster(servers=servers, links=links, client="dev")


# ------------------------------------------------------------------------------------------ independent reference


class Ref:
    """The cost model written out again, simply, straight from the definitions (no code shared with the planner)."""

    def __init__(self, graph: CostGraph, cluster: Cluster):
        self.g, self.c = graph, cluster
        self.srv = {s.name: s for s in cluster.servers}

    def link(self, a: str, b: str):
        sa, sb = self.srv[a].site, self.srv[b].site
        for l in self.c.links:
            if {l.a, l.b} == {sa, sb}:
                return l.rtt, l.bandwidth
        return (0.0, math.inf) if sa == sb else None

    def comp(self, cost: float, s: str) -> float:
        return cost / (self.srv[s].speed * 1e9 * (1 - self.srv[s].load))

    def hop(self, a: str, b: str, sizes) -> float:
        if a == b or not sizes:
            return 0.0
        rtt, bw = self.link(a, b)
        return rtt + sum(x / bw + PER_MSG + PER_BYTE * x for x in sizes)

    def wire(self, a, b, x) -> float:
        return 0.0 if a == b else x / self.link(a, b)[1]

    def energy(self, L, tc, tr) -> float:
        p = self.srv[self.c.client].power
        return p.compute_w * tc + p.radio_w * tr + p.idle_w * max(0.0, L - tc - tr)

    def memory_ok(self, assign: dict[str, str]) -> bool:
        used: dict[str, int] = {}
        for v, s in assign.items():
            used[s] = used.get(s, 0) + self.g.nodes[v].param_bytes
        return all(self.srv[s].memory is None or m <= self.srv[s].memory for s, m in used.items())

    # a chain: op i alone is segment i; servers[i] runs op i; codecs[i] is how op i's output is sent onward
    def chain(self, servers, codecs, fidelity):
        g, cl = self.g, self.c.client
        ops = list(g.nodes.values())
        L = tc = tr = 0.0
        fid = 1.0
        x_in = g.tensors["x:0"].nbytes
        L += self.hop(cl, servers[0], [x_in])
        tr += self.wire(cl, servers[0], x_in)
        for i, op in enumerate(ops):
            if i:
                t = ops[i - 1].outputs[0]
                nb = g.tensors[t].nbytes * {"none": 1.0, "float16": 0.5, "int8": 0.25}[codecs[i - 1]]
                L += self.hop(servers[i - 1], servers[i], [nb])
                if cl in (servers[i - 1], servers[i]):
                    tr += self.wire(servers[i - 1], servers[i], nb)
                if codecs[i - 1] != "none":
                    fid *= fidelity[t][codecs[i - 1]]
            d = self.comp(op.cost, servers[i])
            L += d
            if servers[i] == cl:
                tc += d
        out = g.tensors[ops[-1].outputs[0]].nbytes
        L += self.hop(servers[-1], cl, [out])
        tr += self.wire(servers[-1], cl, out)
        return L, self.energy(L, tc, tr), fid

    # a DAG with one part per server: parts run when all their inputs are in; None if the servers form a cycle
    def dag(self, assign: dict[str, str]):
        g, cl = self.g, self.c.client
        used = set(assign.values())
        need: dict[tuple[str, str], set[str]] = {}  # (from server, to server) -> operation outputs
        need_in: dict[str, set[str]] = {}  # server -> model inputs it needs from the client
        for t, info in g.tensors.items():
            for c in info.consumers:
                if info.producer is None:
                    if assign[c] != cl:
                        need_in.setdefault(assign[c], set()).add(t)
                elif assign[c] != assign[info.producer]:
                    need.setdefault((assign[info.producer], assign[c]), set()).add(t)
        finish: dict[str, float] = {}
        while len(finish) < len(used):
            ready = [s for s in used - set(finish) if all(a in finish for (a, b) in need if b == s)]
            if not ready:
                return None  # the servers depend on each other in a cycle
            for s in ready:
                start = self.hop(cl, s, [g.tensors[t].nbytes for t in need_in.get(s, ())])
                for (a, b), ts in need.items():
                    if b == s:
                        start = max(start, finish[a] + self.hop(a, s, [g.tensors[t].nbytes for t in ts]))
                finish[s] = start + sum(self.comp(g.nodes[v].cost, s) for v in assign if assign[v] == s)
        L = max(finish.values())
        by_src: dict[str, list[int]] = {}
        for t in g.outputs:
            by_src.setdefault(assign[g.tensors[t].producer], []).append(g.tensors[t].nbytes)
        for a, sizes in by_src.items():
            L = max(L, finish[a] + self.hop(a, cl, sizes))
        tc = sum(self.comp(g.nodes[v].cost, cl) for v in assign if assign[v] == cl)
        tr = sum(self.wire(a, b, g.tensors[t].nbytes) for (a, b), ts in need.items() if cl in (a, b) for t in ts)
        tr += sum(self.wire(cl, b, g.tensors[t].nbytes) for b, ts in need_in.items() for t in ts)
        tr += sum(self.wire(a, cl, x) for a, sizes in by_src.items() for x in sizes)
        return L, self.energy(L, tc, tr)

    def bottleneck(self, assign: dict[str, str]) -> float:
        g, cl = self.g, self.c.client
        load: dict = {}
        for v, s in assign.items():
            load[s] = load.get(s, 0.0) + self.comp(g.nodes[v].cost, s)
        for t, info in g.tensors.items():
            src = cl if info.producer is None else assign[info.producer]
            dests = {assign[c] for c in info.consumers} | ({cl} if info.is_output else set())
            for d in dests - {src}:
                key = (self.srv[src].site, self.srv[d].site)
                load[key] = load.get(key, 0.0) + self.wire(src, d, info.nbytes)
        return max(load.values())


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)


def pareto_points(points):
    pts = set(points)
    return {p for p in pts if not any(q != p and q[0] <= p[0] and q[1] <= p[1] and q[2] >= p[2] for q in pts)}
