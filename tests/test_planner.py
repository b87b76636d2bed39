"""Planner: DP and integer programs against independent exhaustive search on small random chains and DAGs,
plan table and per-request choice, errors. Pure Python + scipy: no broker, no TensorFlow."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from splitinfer.planner import (
    BrokerOverhead,
    Cluster,
    CostGraph,
    CostNode,
    Link,
    PlanError,
    PowerProfile,
    Server,
    build_plan_table,
    chain_pareto,
    choose_plan,
    evaluate,
    plan_chain,
    plan_dag,
)

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


# ------------------------------------------------------------------------------------------ chain DP vs exhaustive


@pytest.mark.parametrize("seed", range(12))
def test_chain_dp_matches_exhaustive(seed):
    rng = random.Random(seed)
    m = rng.randint(3, 6)
    g = random_chain(rng, m)
    cluster = random_cluster(rng, rng.randint(2, 4))
    ref = Ref(g, cluster)
    names = [s.name for s in cluster.servers]
    fidelity = {}
    for t in rng.sample(g.cut_points, min(2, len(g.cut_points))):
        fidelity[t] = {"float16": rng.uniform(0.97, 1.0), "int8": rng.uniform(0.85, 0.97)}
    ops = list(g.nodes)
    assert g.cut_points == [f"{o}:0" for o in ops[:-1]]
    results = []
    for servers in itertools.product(names, repeat=m):
        if not ref.memory_ok(dict(zip(ops, servers))):
            continue
        choices = []
        for i in range(m - 1):
            t = f"{ops[i]}:0"
            choices.append(["none"] + (list(fidelity[t]) if t in fidelity and servers[i] != servers[i + 1] else []))
        for codecs in itertools.product(*choices):
            results.append(ref.chain(servers, codecs, fidelity))
    if not results:
        with pytest.raises(PlanError):
            plan_chain(g, cluster)
        return
    # minimum latency, no compression
    plain = [r for r in results if r[2] == 1.0]
    best = plan_chain(g, cluster, "latency")
    assert close(best.latency, min(r[0] for r in plain))
    # minimum energy within a budget that only some plans meet
    budget = sorted(r[0] for r in plain)[len(plain) // 3]
    e = plan_chain(g, cluster, "energy", max_latency=budget)
    assert e.latency <= budget * (1 + REL)
    assert close(e.energy, min(r[1] for r in plain if r[0] <= budget))
    # the whole Pareto front over (latency, energy, fidelity), compression included
    front = chain_pareto(g, cluster, compression=fidelity)
    want = sorted(pareto_points(results))
    got = sorted((p.latency, p.energy, p.fidelity) for p in front)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert all(close(x, y) for x, y in zip(a, b)), (a, b)
    # the DP's numbers are the cost model's numbers for the plan it returns
    again = evaluate(g, cluster, [(p.server, p.nodes) for p in best.parts])
    assert close(again.latency, best.latency) and again.fits_memory


def test_chain_revisits_the_device_when_that_is_best():
    """Heavy middle, tiny last op: device -> cloud -> device beats sending the result back."""
    nodes = [
        CostNode("a", 1e6, ("x:0",), ("a:0",)),
        CostNode("b", 5e10, ("a:0",), ("b:0",)),
        CostNode("c", 1e6, ("b:0",), ("c:0",)),
    ]
    g = CostGraph(nodes, {"x:0": 1_000_000, "a:0": 1_000, "b:0": 1_000, "c:0": 10_000_000}, ["x:0"], ["c:0"])
    cluster = Cluster(
        servers=[Server(name="dev", site="device", speed=1), Server(name="cloud", site="cloud", speed=100)],
        links=[Link(a="device", b="cloud", rtt=0.01, bandwidth=1e6)],
        client="dev",
    )
    p = plan_chain(g, cluster)
    assert [q.server for q in p.parts] == ["dev", "cloud", "dev"]
    assert p.cuts == ["a:0", "b:0"]


# ------------------------------------------------------------------------------------------ MILP vs exhaustive


@pytest.mark.parametrize("seed", range(10))
def test_dag_milp_matches_exhaustive(seed):
    rng = random.Random(100 + seed)
    n = rng.randint(4, 6)
    g = random_dag(rng, n)
    cluster = random_cluster(rng, 3)
    ref = Ref(g, cluster)
    names = [s.name for s in cluster.servers]
    ops = list(g.nodes)
    lat, thr = [], []
    for servers in itertools.product(names, repeat=n):
        assign = dict(zip(ops, servers))
        if not ref.memory_ok(assign):
            continue
        thr.append(ref.bottleneck(assign))
        r = ref.dag(assign)
        if r is not None:
            lat.append(r)
    if not lat:
        with pytest.raises(PlanError):
            plan_dag(g, cluster, "latency")
        return
    p = plan_dag(g, cluster, "latency")
    assert close(p.latency, min(r[0] for r in lat)), (p.latency, min(r[0] for r in lat))
    # the program's plan checked by the reference too
    assert close(ref.dag(p.assignment())[0], p.latency)
    budget = sorted(r[0] for r in lat)[len(lat) // 3]
    e = plan_dag(g, cluster, "energy", max_latency=budget)
    assert e.latency <= budget * (1 + 1e-6)
    assert close(e.energy, min(r[1] for r in lat if r[0] <= budget)), (e.energy, min(r[1] for r in lat if r[0] <= budget))
    t = plan_dag(g, cluster, "throughput")
    assert close(t.bottleneck, min(thr)), (t.bottleneck, min(thr))
    assert close(ref.bottleneck(t.assignment()), t.bottleneck)


@pytest.mark.parametrize("seed", range(4))
def test_milp_on_a_chain_never_beats_the_dp(seed):
    """On a chain the program (one part per server) searches a subset of the DP's plans (which may revisit)."""
    rng = random.Random(200 + seed)
    g = random_chain(rng, 6)
    cluster = random_cluster(rng, 4, memory=False)
    assert plan_chain(g, cluster).latency <= plan_dag(g, cluster).latency * (1 + REL)


def test_coarsened_milp_keeps_dependency_order():
    rng = random.Random(7)
    g = random_dag(rng, 40)
    cluster = random_cluster(rng, 4, memory=False)
    p = plan_dag(g, cluster, "latency", max_nodes=8)
    assert "coarse8" in p.source
    assert sorted(n for q in p.parts for n in q.nodes) == sorted(g.nodes)
    assert p.latency == evaluate(g, cluster, [(q.server, q.nodes) for q in p.parts]).latency


# ------------------------------------------------------------------------------------------ plan table and choice


def three_site_problem():
    """Device, edge, cloud; a model whose activations shrink, so cutting late is cheap to send."""
    sizes = {"x:0": 600_000}
    nodes, prev = [], "x:0"
    for i, (flops, out) in enumerate([(2e8, 800_000), (4e8, 200_000), (6e8, 50_000), (8e8, 20_000), (1e8, 4_000)]):
        nodes.append(CostNode(f"l{i}", flops, (prev,), (f"l{i}:0",), 500_000))
        prev = f"l{i}:0"
        sizes[prev] = out
    g = CostGraph(nodes, sizes, ["x:0"], [prev], name="shrinking")
    cluster = Cluster(
        servers=[
            Server(name="phone", site="device", speed=4, power=PowerProfile(compute_w=4.0, radio_w=1.2, idle_w=0.2)),
            Server(name="edge", site="edge", speed=40),
            Server(name="cloud", site="cloud", speed=200),
        ],
        links=[
            Link(a="device", b="edge", rtt=0.005, bandwidth=5e6),
            Link(a="device", b="cloud", rtt=0.04, bandwidth=2e6),
            Link(a="edge", b="cloud", rtt=0.02, bandwidth=5e7),
        ],
        client="phone",
    )
    return g, cluster


def test_tight_budget_low_battery_gets_a_different_plan():
    g, cluster = three_site_problem()
    table = build_plan_table(g, cluster, compression={"l0:0": {"float16": 0.995, "int8": 0.97}})
    assert len(table) >= 2
    loose_full = choose_plan(table, max_latency=10.0, battery_level=1.0)
    fastest = min(table, key=lambda p: p.latency)
    assert loose_full is fastest
    low_energy = min(table, key=lambda p: p.energy)
    tight_low = choose_plan(table, max_latency=low_energy.latency * 1.01, battery_level=0.05)
    assert tight_low is low_energy
    assert tight_low.id != loose_full.id
    assert tight_low.energy < loose_full.energy
    # every plan in the table is Pareto-optimal or a fallback
    for p in table:
        if not p.fallback_for:
            assert not any(
                q.latency <= p.latency and q.energy <= p.energy and q.fidelity >= p.fidelity
                and (q.latency, q.energy, q.fidelity) != (p.latency, p.energy, p.fidelity)
                for q in table
            )
    # fidelity floor excludes compressed plans
    assert choose_plan(table, min_fidelity=1.0).fidelity == 1.0


def test_down_server_falls_back():
    g, cluster = three_site_problem()
    table = build_plan_table(g, cluster)
    first = choose_plan(table)
    assert first.servers - {"phone"}
    down = next(iter(first.servers - {"phone"}))
    second = choose_plan(table, down_servers={down})
    assert down not in second.servers
    assert second.latency >= first.latency
    with pytest.raises(PlanError, match="unknown server 'gpu9'"):
        choose_plan(table, down_servers={"gpu9"})
    # the table survives a JSON round trip
    from splitinfer.planner import PlanTable

    assert PlanTable.from_json(table.to_json()).plans[0].describe() == table.plans[0].describe()


# ------------------------------------------------------------------------------------------ errors


def test_sla_unreachable_names_best_latency():
    g, cluster = three_site_problem()
    best = plan_chain(g, cluster).latency
    with pytest.raises(PlanError, match=r"latency budget 1 ms is unreachable: best achievable is ") as e:
        plan_chain(g, cluster, "energy", max_latency=0.001)
    assert f"{best * 1e3:.3g} ms" in str(e.value)
    with pytest.raises(PlanError, match="unreachable: best achievable"):
        plan_dag(g, cluster, "energy", max_latency=0.001)
    table = build_plan_table(g, cluster)
    with pytest.raises(PlanError, match="latency budget 1 ms is unreachable"):
        choose_plan(table, max_latency=0.001)


def test_unknown_server_errors():
    g, cluster = three_site_problem()
    with pytest.raises(PlanError, match="unknown server 'tpu'"):
        plan_chain(g, cluster, exclude=["tpu"])
    with pytest.raises(PlanError, match="unknown server 'nobody'"):
        plan_chain(g, cluster.model_copy(update={"client": "nobody"}))
    with pytest.raises(PlanError, match="unknown server"):
        evaluate(g, cluster, [("tpu", list(g.nodes))])


def test_memory_errors():
    g, cluster = three_site_problem()
    small = cluster.model_copy(
        update={"servers": [s.model_copy(update={"memory": 100_000}) for s in cluster.servers]}
    )
    with pytest.raises(PlanError, match=r"no server can hold the operations .*0.50 MB of weights, largest memory 0.10 MB"):
        plan_chain(g, small)
    with pytest.raises(PlanError, match="no server can hold operation 'l0'"):
        plan_dag(g, small)
    # each segment fits somewhere, but all five together do not
    tight = cluster.model_copy(
        update={"servers": [s.model_copy(update={"memory": 600_000}) for s in cluster.servers]}
    )
    with pytest.raises(PlanError, match="no placement fits"):
        plan_chain(g, tight)
    with pytest.raises(PlanError, match="no placement fits"):
        plan_dag(g, tight)
    # a memory limit that binds moves weights elsewhere instead of failing
    roomy = cluster.model_copy(update={"servers": [
        s.model_copy(update={"memory": 1_000_000 if s.name != "phone" else 2_500_000}) for s in cluster.servers]})
    p = plan_chain(g, roomy)
    assert all(m <= 2_500_000 for m in p.memory.values())


def test_bad_inputs():
    with pytest.raises(PlanError, match="reads 'y:0' before anything produces it"):
        CostGraph([CostNode("a", 1.0, ("y:0",), ("a:0",))], {"a:0": 4, "y:0": 4}, [], ["a:0"])
    g, cluster = three_site_problem()
    with pytest.raises(PlanError, match="energy is not defined"):
        plan_dag(g, cluster.model_copy(update={"servers": [s.model_copy(update={"power": None}) for s in cluster.servers]}), "energy")
    with pytest.raises(PlanError, match="no fidelity figure"):
        evaluate(g, cluster, [("phone", ["l0"]), ("cloud", ["l1", "l2", "l3", "l4"])], compression={"l0:0": "int8"})


def test_broker_and_same_site_costs():
    """Same server: free. Same site, other server: the broker hop. Broker overhead is 0.7 ms + 2.5 ms/MB."""
    nodes = [CostNode("a", 0.0, ("x:0",), ("a:0",)), CostNode("b", 0.0, ("a:0",), ("b:0",))]
    g = CostGraph(nodes, {"x:0": 0, "a:0": 1_000_000, "b:0": 0}, ["x:0"], ["b:0"])
    cluster = Cluster(servers=[Server(name="c", site="edge", speed=1), Server(name="d", site="edge", speed=1)],
                      client="c", broker=BrokerOverhead())
    one = evaluate(g, cluster, [("c", ["a", "b"])])
    assert one.latency == 0.0
    two = evaluate(g, cluster, [("c", ["a"]), ("d", ["b"])])
    # a:0 to d (1 MB: 0.7 + 2.5 ms), then b:0 (0 bytes) back to the client c (0.7 ms)
    assert math.isclose(two.latency, 0.0032 + 0.0007)


# ------------------------------------------------------------------------------------------ more behaviour


def test_reference_seconds_and_speed_factors():
    """Costs in seconds on the profiling machine; speed is a factor; load slows a server down."""
    nodes = [CostNode("a", 0.010, ("x:0",), ("a:0",)), CostNode("b", 0.030, ("a:0",), ("b:0",))]
    g = CostGraph(nodes, {"x:0": 0, "a:0": 0, "b:0": 0}, ["x:0"], ["b:0"], unit="seconds")
    cluster = Cluster(servers=[Server(name="dev", site="d", speed=0.5, load=0.5), Server(name="gpu", site="d", speed=4)],
                      client="dev", broker=BrokerOverhead(per_message=0.0, per_byte=0.0))
    assert math.isclose(evaluate(g, cluster, [("dev", ["a", "b"])]).latency, 0.040 / 0.25)
    p = plan_chain(g, cluster)
    assert [q.server for q in p.parts] == ["gpu"] and math.isclose(p.latency, 0.040 / 4)


def test_fidelity_floor_and_fidelity_errors():
    g, cluster = three_site_problem()
    comp = {"l0:0": {"float16": 0.99, "int8": 0.9}, "l1:0": {"int8": 0.95}}
    free = plan_chain(g, cluster, compression=comp)
    strict = plan_chain(g, cluster, compression=comp, min_fidelity=1.0)
    assert strict.fidelity == 1.0 and strict.latency >= free.latency
    assert plan_chain(g, cluster, compression=comp, min_fidelity=0.98).fidelity >= 0.98
    with pytest.raises(PlanError, match="no plan reaches fidelity 1.5"):
        plan_chain(g, cluster, compression=comp, min_fidelity=1.5, max_latency=1.0)
    table = build_plan_table(g, cluster, compression=comp)
    with pytest.raises(PlanError, match="no plan reaches fidelity 1.5: best available is 1"):
        choose_plan(table, min_fidelity=1.5)


def test_choice_policy():
    g, cluster = three_site_problem()
    table = build_plan_table(g, cluster, compression={"l0:0": {"int8": 0.9}})
    budget = sorted(p.latency for p in table)[len(table) // 2]
    low = choose_plan(table, max_latency=budget, battery_level=0.1)
    assert low.latency <= budget
    assert low.energy == min(p.energy for p in table if p.latency <= budget)
    high = choose_plan(table, max_latency=budget, battery_level=0.9)
    assert high.latency == min(p.latency for p in table)
    with pytest.raises(PlanError, match="every plan of shrinking uses a down server"):
        choose_plan(table, down_servers={s.name for s in cluster.servers})
    with pytest.raises(PlanError, match="battery_level must be between 0 and 1"):
        choose_plan(table, battery_level=7)


def test_throughput_plan_may_reuse_a_server_in_dependency_order():
    """A throughput plan can send work back to a server it left; its parts are still in dependency order."""
    rng = random.Random(11)
    for _ in range(5):
        g = random_dag(rng, 8)
        cluster = random_cluster(rng, 3, memory=False)
        p = plan_dag(g, cluster, "throughput")
        seen = set()
        for i, part in enumerate(p.parts):
            for n in part.nodes:
                for t in g.nodes[n].inputs:
                    prod = g.tensors[t].producer
                    assert prod is None or prod in seen or prod in part.nodes
            seen.update(part.nodes)


def test_coarsen_blocks_are_contiguous_and_bounded():
    g = random_dag(random.Random(3), 50)
    from splitinfer.planner import coarsen

    coarse, members = coarsen(g, 7)
    assert len(coarse.nodes) <= 7
    flat = [n for b in coarse.order for n in members[b]]
    assert flat == g.order
    assert math.isclose(coarse.total_cost, g.total_cost)


def test_planner_imports_no_broker_and_no_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys, splitinfer.planner as p; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'aio_pika', 'aiormq', 'pika')]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
