"""The planner on a real model: MobileNetV3Small (weights=None) through the splitter's ModelGraph and the adapter.

Per-operation costs are the profiler's FLOPs (splitinfer.monitor.node_flops) when it is available, else the
number of output elements per operation (a stand-in with the right shape: big early layers, cheap late ones).
"""

from __future__ import annotations

import itertools
import random

import pytest

from splitinfer import _tf  # noqa: F401
import keras

from splitinfer.planner import (
    Cluster,
    CostGraph,
    CostNode,
    Link,
    PowerProfile,
    Server,
    build_plan_table,
    chain_pareto,
    choose_plan,
    coarsen,
    cost_graph_from,
    plan_chain,
    plan_dag,
)
from splitinfer.splitter.graph import ModelGraph
from splitinfer.splitter.partition import split_at_cuts, split_by_groups

from tests.support.planner_cases import Ref, close, pareto_points


def _costs(graph: ModelGraph) -> tuple[dict[str, float], str]:
    try:
        from splitinfer.monitor import node_flops

        return {k: float(v) for k, v in node_flops(graph).items()}, "flops"
    except Exception:  # the profiler is someone else's module and may be mid-change
        out = {}
        for n in graph.compute_nodes:
            out[n] = float(sum(graph.tensors[t].nbytes() // 4 for t in graph.nodes[n].outputs))
        return out, "elements"


@pytest.fixture(scope="module")
def mobilenet():
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(96, 96, 3))
    graph = ModelGraph(model)
    costs, kind = _costs(graph)
    return graph, cost_graph_from(graph, costs), kind


def cluster3(device_memory: int | None = None) -> Cluster:
    return Cluster(
        servers=[
            Server(name="phone", site="device", speed=2.0, memory=device_memory,
                   power=PowerProfile(compute_w=3.5, radio_w=1.3, idle_w=0.25)),
            Server(name="edge", site="edge", speed=25.0, load=0.2),
            Server(name="cloud", site="cloud", speed=120.0),
        ],
        links=[
            Link(a="device", b="edge", rtt=0.006, bandwidth=1.5e6),
            Link(a="device", b="cloud", rtt=0.045, bandwidth=1.0e6),
            Link(a="edge", b="cloud", rtt=0.02, bandwidth=2.5e7),
        ],
        client="phone",
    )


def chain_of(cg: CostGraph, cuts: list[str]) -> CostGraph:
    """The model as a chain of the segments between the chosen cut points (real FLOPs, weights and bytes)."""
    nodes, sizes, prev = [], {"x:0": sum(cg.tensors[t].nbytes for t in cg.inputs)}, "x:0"
    bounds = [*cuts, None]
    done = 0
    for i, t in enumerate(bounds):
        mask = (1 << len(cg.order)) - 1 if t is None else cg.ancestor_masks[cg.index[cg.tensors[t].producer]]
        members = cg.names_in(mask & ~done)
        done = mask
        out = f"op{i}:0"
        sizes[out] = cg.tensors[t].nbytes if t else sum(cg.tensors[o].nbytes for o in cg.outputs)
        nodes.append(CostNode(f"op{i}", sum(cg.nodes[n].cost for n in members), (prev,), (out,),
                              sum(cg.nodes[n].param_bytes for n in members)))
        prev = out
    return CostGraph(nodes, sizes, ["x:0"], [prev], name="mobilenet-chain")


def test_adapter_matches_the_splitter(mobilenet):
    graph, cg, _ = mobilenet
    assert set(cg.nodes) == set(graph.compute_nodes)
    assert cg.cut_points == graph.cut_points()  # one output: the planner's cuts are exactly the splitter's
    assert sum(n.param_bytes for n in cg.nodes.values()) == graph.model.count_params() * 4
    assert cg.tensors[cg.inputs[0]].nbytes == 96 * 96 * 3 * 4


def test_dp_plan_is_a_valid_split(mobilenet):
    graph, cg, _ = mobilenet
    for budget_plan in (plan_chain(cg, cluster3()), plan_chain(cg, cluster3(), "energy")):
        parts = split_at_cuts(graph, budget_plan.cuts) if budget_plan.cuts else None
        if parts:
            assert [sorted(n for n in p.nodes if not graph.nodes[n].is_input) for p in parts] == [
                sorted(p.nodes) for p in budget_plan.parts
            ]


@pytest.mark.parametrize("seed", range(3))
def test_dp_matches_exhaustive_on_mobilenet_segments(mobilenet, seed):
    graph, cg, _ = mobilenet
    rng = random.Random(seed)
    cuts = sorted(rng.sample(cg.cut_points, 6), key=cg.cut_points.index)
    g = chain_of(cg, cuts)
    total_params = sum(n.param_bytes for n in g.nodes.values())
    cluster = cluster3(device_memory=int(total_params * rng.uniform(0.2, 0.6)))
    fidelity = {t: {"float16": 0.999, "int8": rng.uniform(0.9, 0.99)} for t in rng.sample(g.cut_points, 2)}
    ref = Ref(g, cluster)
    ops = list(g.nodes)
    names = [s.name for s in cluster.servers]
    results = []
    for servers in itertools.product(names, repeat=len(ops)):
        if not ref.memory_ok(dict(zip(ops, servers))):
            continue
        choices = [["none"] + (list(fidelity[f"{ops[i]}:0"]) if f"{ops[i]}:0" in fidelity
                               and servers[i] != servers[i + 1] else []) for i in range(len(ops) - 1)]
        for codecs in itertools.product(*choices):
            results.append(ref.chain(servers, codecs, fidelity))
    plain = [r for r in results if r[2] == 1.0]
    assert close(plan_chain(g, cluster).latency, min(r[0] for r in plain))
    budget = sorted(r[0] for r in plain)[len(plain) // 4]
    assert close(plan_chain(g, cluster, "energy", max_latency=budget).energy,
                 min(r[1] for r in plain if r[0] <= budget))
    got = sorted((p.latency, p.energy, p.fidelity) for p in chain_pareto(g, cluster, compression=fidelity))
    want = sorted(pareto_points(results))
    assert len(got) == len(want) and all(close(a, b) for x, y in zip(got, want) for a, b in zip(x, y))


def test_milp_matches_exhaustive_on_coarsened_mobilenet(mobilenet):
    graph, cg, _ = mobilenet
    coarse, members = coarsen(cg, 6)
    cluster = cluster3()
    ref = Ref(coarse, cluster)
    ops = list(coarse.nodes)
    lat, thr = [], []
    for servers in itertools.product([s.name for s in cluster.servers], repeat=len(ops)):
        assign = dict(zip(ops, servers))
        thr.append(ref.bottleneck(assign))
        r = ref.dag(assign)
        if r is not None:
            lat.append(r)
    assert close(plan_dag(coarse, cluster).latency, min(r[0] for r in lat))
    budget = sorted(r[0] for r in lat)[len(lat) // 4]
    assert close(plan_dag(coarse, cluster, "energy", max_latency=budget).energy,
                 min(r[1] for r in lat if r[0] <= budget))
    assert close(plan_dag(coarse, cluster, "throughput").bottleneck, min(thr))
    # the same plan expanded to operations is a valid partition for the splitter
    p = plan_dag(cg, cluster, max_nodes=6)
    parts = split_by_groups(graph, p.groups())
    assert [sorted(n for n in q.nodes) for q in parts] == [sorted(q.nodes) for q in p.parts]


def test_plan_table_on_mobilenet(mobilenet):
    graph, cg, _ = mobilenet
    cluster = cluster3()
    some_cut = cg.cut_points[len(cg.cut_points) // 2]
    table = build_plan_table(cg, cluster, compression={some_cut: {"float16": 0.999, "int8": 0.97}})
    fast = choose_plan(table, max_latency=10.0, battery_level=0.9)
    frugal = choose_plan(table, max_latency=max(p.latency for p in table), battery_level=0.1)
    assert fast.latency == min(p.latency for p in table)
    assert frugal.energy == min(p.energy for p in table)
    assert len(table) >= 2


def test_a_variants_fidelity_is_its_agreement_with_the_reference():
    from keras import layers

    from splitinfer.monitor.fidelity import variant_fidelity
    from splitinfer.splitter import ModelGraph, SplitError

    def model(seed: int, width: int, out_name: str = "head"):
        keras.utils.set_random_seed(seed)
        inp = keras.Input((8, 8, 3), name="img")
        x = layers.Conv2D(width, 3, activation="relu", name="c")(inp)
        return keras.Model(inp, layers.Dense(5, name=out_name)(layers.GlobalAveragePooling2D(name="g")(x)))

    ref = ModelGraph(model(0, 8))
    assert variant_fidelity(ref, ModelGraph(model(0, 8))) == 1.0
    other = variant_fidelity(ref, ModelGraph(model(1, 4)))
    assert 0.0 <= other <= 1.0
    with pytest.raises(SplitError, match="outputs"):
        variant_fidelity(ref, ModelGraph(model(0, 8, out_name="other")))
