"""Planning time on a 200-operation DAG over 10 servers (issue 5: target under 1 s).

The DAG looks like a CNN: a stem, then stages of residual blocks (a two-branch block with an add), inception-like
blocks (three parallel branches and a concat) and plain layers, with activations shrinking stage by stage, so it
has single-tensor cut points between blocks and parallel branches inside them. Ten servers: the client device
(battery, limited memory), three edge boxes at two edge sites and six cloud servers at two cloud sites.

What is timed:
  chain DP       exact over the valid cut points: min latency, min device energy under a budget, Pareto front
  milp (coarse)  the integer program on the DAG coarsened to N contiguous blocks (exact for placing those blocks)
  milp (full)    the integer program on all operations (--full-milp; usually far over 1 s: reported with its gap)
  plan table     build_plan_table: chain Pareto front + fallbacks for every single server down + coarse MILPs
  deploy plan    plan_deployment, what `splitinfer deploy MODEL` runs: the plan table with time-limited MILPs,
                 the objective's best plan, at most 6 plans (the headline number: target under 1 s)

Usage: python benchmarks/plan_bench.py [--ops 200] [--servers 10] [--seed 0] [--blocks 8,12] [--full-milp]
                                       [--time-limit 20] [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from splitinfer.planner import (
    Cluster,
    CostGraph,
    CostNode,
    Link,
    PlanError,
    PowerProfile,
    Server,
    build_plan_table,
    chain_pareto,
    plan_chain,
    plan_dag,
    plan_deployment,
)


def cnn_like_dag(n_ops: int, rng: random.Random) -> CostGraph:
    """MobileNet-like costs: separable convolutions (2 x hw^2 x (c_in x c_out + 9 c_in) FLOPs), float32 tensors."""
    nodes: list[CostNode] = []
    sizes = {"image:0": 224 * 224 * 3 * 4}
    hw, ch = 112, 16

    def op(inputs, flops, out_elems, params):
        name = f"op{len(nodes)}"
        nodes.append(CostNode(name, float(flops), tuple(inputs), (f"{name}:0",), int(params) * 4))
        sizes[f"{name}:0"] = int(out_elems) * 4
        return f"{name}:0"

    def sep(cin, cout, size):
        return 2 * size * size * (cin * cout + 9 * cin), cin * cout + 9 * cin

    x = op(["image:0"], 2 * 112 * 112 * 27 * 16, hw * hw * ch, 27 * 16)
    while len(nodes) < n_ops - 2:
        left = n_ops - 2 - len(nodes)
        kind = rng.choice(["res", "incep", "plain"]) if left >= 8 else "plain"
        elems = hw * hw * ch
        if kind == "res":
            f, w = sep(ch, ch, hw)
            a = op([x], f, elems, w)
            b = op([a], f, elems, w)
            x = op([x, b], elems, elems, 0)
        elif kind == "incep":
            br = []
            third = max(1, ch // 3)
            for _ in range(3):
                f, w = sep(ch, third, hw)
                y = op([x], f, hw * hw * third, w)
                f, w = sep(third, third, hw)
                br.append(op([y], f, hw * hw * third, w))
            x = op(br, 0, hw * hw * third * 3, 0)
            f, w = sep(third * 3, ch, hw)
            x = op([x], f, elems, w)
        else:
            f, w = sep(ch, ch, hw)
            x = op([x], f, elems, w)
        if left >= 8 and rng.random() < 0.3 and hw > 7:
            hw //= 2
            f, w = sep(ch, min(ch * 2, 512), hw)
            ch = min(ch * 2, 512)
            x = op([x], f, hw * hw * ch, w)
    x = op([x], hw * hw * ch, ch, 0)  # global pool
    out = op([x], 2 * ch * 1000, 1000, ch * 1000 + 1000)  # classifier
    return CostGraph(nodes, sizes, ["image:0"], [out], name=f"cnn{len(nodes)}")


def ten_servers(n: int, rng: random.Random) -> Cluster:
    servers = [Server(name="phone", site="device", speed=3.0, memory=8_000_000,
                      power=PowerProfile(compute_w=3.5, radio_w=1.3, idle_w=0.25))]
    edge_sites, cloud_sites = ["edge-a", "edge-b"], ["cloud-eu", "cloud-us"]
    for i in range(1, n):
        if i <= max(1, (n - 1) // 3):
            servers.append(Server(name=f"edge{i}", site=edge_sites[i % 2], speed=rng.uniform(15, 40),
                                  load=rng.uniform(0, 0.5), memory=rng.choice([64_000_000, 256_000_000])))
        else:
            servers.append(Server(name=f"cloud{i}", site=cloud_sites[i % 2], speed=rng.uniform(80, 300),
                                  load=rng.uniform(0, 0.7)))
    mbps = 1e6 / 8
    links = [
        Link(a="device", b="edge-a", rtt=0.005, bandwidth=40 * mbps),
        Link(a="device", b="edge-b", rtt=0.012, bandwidth=15 * mbps),
        Link(a="device", b="cloud-eu", rtt=0.04, bandwidth=10 * mbps),
        Link(a="device", b="cloud-us", rtt=0.11, bandwidth=10 * mbps),
        Link(a="edge-a", b="edge-b", rtt=0.004, bandwidth=500 * mbps),
        Link(a="edge-a", b="cloud-eu", rtt=0.02, bandwidth=300 * mbps),
        Link(a="edge-b", b="cloud-eu", rtt=0.025, bandwidth=300 * mbps),
        Link(a="edge-a", b="cloud-us", rtt=0.09, bandwidth=200 * mbps),
        Link(a="edge-b", b="cloud-us", rtt=0.09, bandwidth=200 * mbps),
        Link(a="cloud-eu", b="cloud-us", rtt=0.08, bandwidth=1000 * mbps),
    ]
    return Cluster(servers=servers, links=links, client="phone")


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run(args) -> dict:
    rng = random.Random(args.seed)
    graph = cnn_like_dag(args.ops, rng)
    cluster = ten_servers(args.servers, rng)
    rows = []

    def record(name, fn, note=""):
        try:
            secs, plan = timed(fn, args.repeat)
        except PlanError as e:
            rows.append({"step": name, "seconds": None, "error": str(e), "note": note})
            return None
        if isinstance(plan, list):
            rows.append({"step": name, "seconds": secs, "plans": len(plan), "note": note,
                         "latency_ms": plan[0].latency * 1e3, "energy_j": plan[0].energy,
                         "plan": plan[0].describe()})
        elif hasattr(plan, "plans"):
            rows.append({"step": name, "seconds": secs, "plans": len(plan), "note": note,
                         "latency_ms": plan.plans[0].latency * 1e3, "energy_j": plan.plans[0].energy,
                         "plan": plan.plans[0].describe()})
        else:
            rows.append({"step": name, "seconds": secs, "plans": 1, "note": note or plan.source,
                         "latency_ms": plan.latency * 1e3, "energy_j": plan.energy,
                         "bottleneck_ms": plan.bottleneck * 1e3, "plan": plan.describe()})
        return plan

    fastest = record("chain DP: min latency", lambda: plan_chain(graph, cluster))
    budget = 1.5 * fastest.latency if fastest else None
    record("chain DP: min energy, budget 1.5x", lambda: plan_chain(graph, cluster, "energy", max_latency=budget))
    cut = graph.cut_points[len(graph.cut_points) // 3]
    comp = {cut: {"float16": 0.999, "int8": 0.98}}
    record("chain DP: Pareto front", lambda: chain_pareto(graph, cluster, compression=comp))
    blocks = [int(b) for b in str(args.blocks).split(",")]
    for nb in blocks:
        for obj in ("latency", "energy", "throughput"):
            record(f"milp {obj} ({nb} blocks)",
                   lambda obj=obj, nb=nb: plan_dag(graph, cluster, obj,
                                                   max_latency=budget if obj == "energy" else None,
                                                   max_nodes=nb, time_limit=args.time_limit))
    if args.full_milp:
        record(f"milp latency (all {len(graph.nodes)} ops)",
               lambda: plan_dag(graph, cluster, "latency", time_limit=args.time_limit),
               note=f"time limit {args.time_limit} s")
    record("plan table: DP front + fallbacks",
           lambda: build_plan_table(graph, cluster, compression=comp, dag=False))
    record(f"plan table: + MILPs ({blocks[0]} blocks)",
           lambda: build_plan_table(graph, cluster, compression=comp, milp_max_nodes=blocks[0],
                                    time_limit=args.time_limit))
    for obj in ("latency", "energy", "throughput"):
        record(f"deploy plan: {obj} objective", lambda obj=obj: plan_deployment(graph, cluster, obj, compression=comp),
               note="plan_deployment, as `splitinfer deploy MODEL` plans")
    return {
        "graph": {"name": graph.name, "operations": len(graph.nodes), "tensors": len(graph.tensors),
                  "cut_points": len(graph.cut_points), "gflop": graph.total_cost / 1e9},
        "servers": len(cluster.servers),
        "seed": args.seed,
        "rows": rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", type=int, default=200)
    ap.add_argument("--servers", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", default="8,12", help="coarsen the DAG to these many blocks for the MILP (comma list)")
    ap.add_argument("--time-limit", type=float, default=20.0, help="MILP time limit, seconds")
    ap.add_argument("--full-milp", action="store_true", help="also try the MILP on every operation")
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs per step")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = run(args)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    g = result["graph"]
    table = Table(title=f"planning {g['name']}: {g['operations']} operations, {g['cut_points']} cut points, "
                        f"{g['gflop']:.2f} GFLOP, {result['servers']} servers")
    for col in ("step", "seconds", "plans", "latency ms", "energy J", "plan / note"):
        table.add_column(col, justify="right" if col in ("seconds", "plans", "latency ms", "energy J") else "left")
    for r in result["rows"]:
        if r.get("error"):
            table.add_row(r["step"], "-", "-", "-", "-", f"[red]{escape(r['error'])}")
            continue
        secs = f"{r['seconds']:.3f}"
        table.add_row(r["step"], f"[green]{secs}" if r["seconds"] < 1 else f"[yellow]{secs}", str(r["plans"]),
                      f"{r['latency_ms']:.1f}", f"{r['energy_j']:.4f}",
                      escape(r["plan"][:70] + (f"  ({r['note']})" if r.get("note") else "")))
    Console(width=max(Console().width, 150)).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
