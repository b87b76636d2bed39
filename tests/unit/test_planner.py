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

from tests.support.planner_cases import REL, Ref, close, pareto_points, random_chain, random_cluster, random_dag


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
    # without compression to choose (the DP on arrays): the front over (latency, energy)
    plain_front = sorted((p.latency, p.energy) for p in chain_pareto(g, cluster))
    want_plain = sorted((x[0], x[1]) for x in pareto_points(plain))
    assert len(plain_front) == len(want_plain)
    for a, b in zip(plain_front, want_plain):
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


def test_a_job_without_requirements_gets_the_plan_of_the_deployments_objective():
    from splitinfer.planner import plan_deployment

    g, cluster = three_site_problem()
    codecs = {"l0:0": {"float16": 0.995, "int8": 0.97}}
    by_objective = {o: plan_deployment(g, cluster, o, max_plans=6, compression=codecs)
                    for o in ("latency", "energy", "throughput")}
    energy = by_objective["energy"]
    assert len({p.energy for p in energy.plans}) >= 2, "the energy table offers a choice"
    chosen = choose_plan(energy)
    assert chosen.id == energy.primary and chosen.energy == min(p.energy for p in energy.plans)
    assert chosen.latency > min(p.latency for p in energy.plans), "the fastest plan would have been another"
    latency = by_objective["latency"]
    assert choose_plan(latency).latency == min(p.latency for p in latency.plans)
    throughput = by_objective["throughput"]
    assert choose_plan(throughput).bottleneck == min(p.bottleneck for p in throughput.plans)
    # a job's own requirement still decides within the objective: the least energy among the plans fast enough
    budget = sorted(p.latency for p in energy.plans)[1] * 1.001
    within = choose_plan(energy, max_latency=budget)
    assert within.latency <= budget and within.energy == min(p.energy for p in energy.plans if p.latency <= budget)


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


# ------------------------------------------------------------------------------------------ runtimes per part

def _runtime_chain(server_runtimes=None):
    """A chain of 6 operations whose first three run 4x faster on onnxruntime and last three 2x slower."""
    ops = [f"op{i}" for i in range(6)]
    tf = {o: 0.010 for o in ops}
    ort = {o: (0.0025 if i < 3 else 0.020) for i, o in enumerate(ops)}
    nodes = [CostNode(o, min(tf[o], ort[o]), (f"op{i - 1}:0" if i else "x",), (f"{o}:0",)) for i, o in enumerate(ops)]
    graph = CostGraph(nodes, {"x": 1000, **{f"{o}:0": 1000 for o in ops}}, ["x"], ["op5:0"], unit="seconds",
                      runtime_costs={"tf": tf, "onnxruntime": ort})
    cluster = Cluster(servers=[Server(name="dev", site="device", speed=1.0),
                               Server(name="cloud", site="cloud", speed=1.0, runtimes=server_runtimes)],
                      links=[Link(a="device", b="cloud", rtt=0.001, bandwidth=1e9)], client="dev")
    return graph, cluster


def test_each_part_runs_on_its_measured_fastest_runtime():
    from splitinfer.planner import plan_deployment

    graph, cluster = _runtime_chain()
    table = plan_deployment(graph, cluster, "latency")
    for plan in table.plans:
        for part in plan.parts:
            tf = sum(graph.runtime_costs["tf"][n] for n in part.nodes)
            ort = sum(graph.runtime_costs["onnxruntime"][n] for n in part.nodes)
            assert part.runtime == ("onnxruntime" if ort < tf else "tf"), (part, tf, ort)
    # predictions use the chosen runtime's cost: the whole chain as one part costs 0.06 s on tf (0.0675 s on
    # onnxruntime); as two parts on the same server (no hop between them) 0.0075 s on onnxruntime + 0.03 s on tf
    alone = evaluate(graph, cluster, [("cloud", list(graph.nodes))])
    split = evaluate(graph, cluster, [("cloud", ["op0", "op1", "op2"]), ("cloud", ["op3", "op4", "op5"])])
    assert alone.runtimes == ["tf"] and split.runtimes == ["onnxruntime", "tf"]
    assert alone.latency - split.latency == pytest.approx(0.06 - 0.0375)


def test_a_server_without_a_runtime_never_gets_a_part_on_it():
    graph, cluster = _runtime_chain(server_runtimes=("tf",))
    pred = evaluate(graph, cluster, [("cloud", ["op0", "op1", "op2"]), ("cloud", ["op3", "op4", "op5"])])
    assert pred.runtimes == ["tf", "tf"]
    again = CostGraph.from_json(graph.to_json())
    assert again.runtime_costs == graph.runtime_costs


# ------------------------------------------------------------------------------------------ privacy floor

@pytest.mark.parametrize("seed", range(10))
def test_a_privacy_floor_is_never_violated_and_the_dp_stays_exact_under_it(seed):
    """Random chains and DAGs, random floors (the first K operations, or everything up to a tensor): no plan the
    chain DP, the integer program or the plan table makes runs a floored operation off the client's site, and the
    chain DP's best latency is the exhaustive best among the placements that honour the floor."""
    from splitinfer.planner import build_plan_table

    rng = random.Random(1000 + seed)
    m = rng.randint(3, 6)
    chain = random_chain(rng, m)
    cluster = random_cluster(rng, rng.randint(2, 4), memory=False)
    k = rng.randint(1, m - 1)
    floored = chain.with_device_only(chain.privacy_floor(first_ops=k))
    device_site = cluster.server(cluster.client).site
    site = {s.name: s.site for s in cluster.servers}

    def honours(plan, graph=floored) -> bool:
        return all(site[p.server] == device_site for p in plan.parts for n in p.nodes if n in graph.device_only)

    best = plan_chain(floored, cluster)
    assert honours(best)
    ref = Ref(chain, cluster)
    names = [s.name for s in cluster.servers]
    ops = list(chain.nodes)
    allowed = [ref.chain(servers, ["none"] * (m - 1), {}) for servers in itertools.product(names, repeat=m)
               if all(site[servers[i]] == device_site for i in range(k))]
    assert close(best.latency, min(r[0] for r in allowed))
    assert all(honours(p) for p in build_plan_table(floored, cluster).plans)
    with pytest.raises(PlanError, match="privacy floor"):
        evaluate(floored, cluster, [(next(n for n in names if site[n] != device_site), ops)])
    dag = random_dag(rng, rng.randint(4, 8))
    tensor = rng.choice([t for t, info in dag.tensors.items() if info.producer is not None])
    floored_dag = dag.with_device_only(dag.privacy_floor(up_to=tensor))
    assert dag.tensors[tensor].producer in floored_dag.device_only
    for objective in ("latency", "throughput"):
        assert honours(plan_dag(floored_dag, cluster, objective, time_limit=10), floored_dag)
    assert all(honours(p, floored_dag) for p in build_plan_table(floored_dag, cluster, time_limit=10).plans)


# ------------------------------------------------------------------------------------------ planning many servers


def crowded_cluster(rng: random.Random, per_site: int) -> Cluster:
    """random_cluster with many servers per site: some with memory that binds, some tied in speed, some missing a
    runtime, so the pruning of dominated servers meets every case it must keep apart."""
    base = random_cluster(rng, 3)
    servers = list(base.servers)
    for site in ("edge", "cloud"):
        speeds = [rng.uniform(5, 100) for _ in range(per_site)]
        speeds[-1] = speeds[0]  # a tie
        for i, speed in enumerate(speeds):
            servers.append(Server(name=f"{site}{i}", site=site, speed=speed, load=rng.choice([0.0, rng.uniform(0, 0.6)]),
                                  memory=rng.choice([None, None, rng.randint(3_000_000, 20_000_000)]),
                                  runtimes=rng.choice([None, None, ("keras",)])))
    return Cluster(servers=servers, links=base.links, client=base.client, broker=base.broker)


@pytest.mark.parametrize("seed", range(10))
def test_pruning_dominated_servers_keeps_the_chain_dp_exact(seed):
    """The DP on the servers that dominated_servers leaves finds the same Pareto front over (latency, energy,
    fidelity), with and without a server down, as the DP on every server; and plans only on servers that stay."""
    from splitinfer.planner.chain import chain_labels
    from splitinfer.planner.costmodel import dominated_servers

    rng = random.Random(2000 + seed)
    g = random_chain(rng, rng.randint(4, 9))
    cluster = crowded_cluster(rng, rng.randint(3, 6))
    fidelity = {t: {"float16": rng.uniform(0.97, 1.0)} for t in rng.sample(g.cut_points, min(2, len(g.cut_points)))}
    dominated = dominated_servers(g, cluster)
    assert dominated and cluster.client not in dominated
    for exclude in ([], [rng.choice([s.name for s in cluster.servers if s.name != cluster.client])]):
        points = []
        for prune in (True, False):
            try:
                _, _, final = chain_labels(g, cluster, compression=fidelity, exclude=exclude, prune_dominated=prune)
            except PlanError as e:
                points.append(str(e))
                continue
            points.append(sorted(pareto_points([(l.latency, l.energy, l.fidelity) for l in final])))
        assert len(points[0]) == len(points[1])
        for a, b in zip(*points):
            assert a == b if isinstance(a, str) else all(close(x, y) for x, y in zip(a, b)), (a, b)
    gone = set(dominated)
    for plan in chain_pareto(g, cluster, compression=fidelity):
        assert not plan.servers & gone


def test_the_integer_program_on_a_crowded_cluster_keeps_the_client_and_the_best_of_each_site():
    from splitinfer.planner.milp import site_candidates

    rng = random.Random(7)
    g = random_dag(rng, 8)
    cluster = crowded_cluster(rng, 6)
    kept, left = site_candidates(g, cluster, max_servers=4)
    assert cluster.client in kept and len(kept) == 1 + 4 and set(kept).isdisjoint(left)
    assert set(kept) | set(left) == {s.name for s in cluster.servers}
    fastest_holder = max((s for s in cluster.servers if s.site == "cloud" and s.memory is None and s.runtimes is None),
                         key=lambda s: s.speed * (1 - s.load))
    assert fastest_holder.name in kept
    plan = plan_dag(g, cluster, "latency", time_limit=10, max_servers=4)
    assert plan.servers <= set(kept)
