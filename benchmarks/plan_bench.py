"""Planning time as the graph and the cluster grow, and the steps of one deploy's planning.

The DAG looks like a CNN: a stem, then stages of residual blocks (a two-branch block with an add), inception-like
blocks (three parallel branches and a concat) and plain layers, with activations shrinking stage by stage, so it
has single-tensor cut points between blocks and parallel branches inside them. The cluster: the client device
(battery, limited memory), a third of the rest edge boxes at two edge sites (some with memory that binds), the
others cloud servers at two cloud sites; `--shape spread` puts every server at its own site instead (links
between every pair), the case where no server stands in for another.

Grid (the default): operations x servers (--grid-ops, --grid-servers), per cell
  chain DP       exact over the valid cut points, minimum latency
  Pareto table   build_plan_table without the integer program: the chain's Pareto front over (latency, device
                 energy) and the fallbacks for every server it uses going down
  milp           the integer program on the DAG coarsened to 8 blocks, latency, with deploy's time limit and its
                 servers (site_candidates)
  deploy plan    plan_deployment, what `splitinfer deploy MODEL` runs (the headline: target under 2 s for a
                 1000-operation DAG over 50 servers)
a table, --json, and a log-log plot (--plot, default docs/plan_bench.png).

--steps: every step of one deploy's planning on --ops x --servers, as before (chain DP objectives, MILPs per
objective and block count, plan tables, deploy plans per objective).

Usage: python benchmarks/plan_bench.py [--grid-ops 50,200,500,1000,2000] [--grid-servers 3,10,50,100]
                                       [--shape sites|spread] [--plot PNG] [--json]
       python benchmarks/plan_bench.py --steps [--ops 200] [--servers 10] [--blocks 8,12] [--full-milp]
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
from splitinfer.planner.costmodel import dominated_servers
from splitinfer.planner.milp import MILP_MAX_SERVERS
from splitinfer.planner.optimize import MILP_TIME_LIMIT_S


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


def sites_cluster(n: int, rng: random.Random) -> Cluster:
    """n servers at five sites: the device, two edge sites, two cloud sites."""
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


def spread_cluster(n: int, rng: random.Random) -> Cluster:
    """n servers each at a site of its own (edge or cloud as in sites_cluster), a link between every two sites."""
    base = sites_cluster(n, rng)
    servers, kind = [base.servers[0]], {"device": "device"}
    for s in base.servers[1:]:
        servers.append(s.model_copy(update={"site": s.name}))
        kind[s.name] = "edge" if s.name.startswith("edge") else "cloud"
    mbps = 1e6 / 8
    figures = {  # (rtt range s, bandwidth range Mbit/s) per kind of site pair
        ("device", "edge"): ((0.005, 0.015), (15, 40)), ("cloud", "device"): ((0.04, 0.11), (10, 10)),
        ("edge", "edge"): ((0.003, 0.006), (300, 500)), ("cloud", "edge"): ((0.02, 0.09), (200, 300)),
        ("cloud", "cloud"): ((0.01, 0.08), (1000, 1000)),
    }
    sites = [s.site for s in servers]
    links = []
    for i, a in enumerate(sites):
        for b in sites[i + 1:]:
            (r0, r1), (b0, b1) = figures[tuple(sorted((kind[a], kind[b])))]
            links.append(Link(a=a, b=b, rtt=rng.uniform(r0, r1), bandwidth=rng.uniform(b0, b1) * mbps))
    return Cluster(servers=servers, links=links, client=base.client)


SHAPES = {"sites": sites_cluster, "spread": spread_cluster}


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
    cluster = sites_cluster(args.servers, rng)
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
                                                   max_nodes=nb, time_limit=args.time_limit,
                                                   max_servers=MILP_MAX_SERVERS))
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


GRID_STEPS = ("chain DP", "Pareto table", "milp", "deploy plan")
TARGET_OPS, TARGET_SERVERS, TARGET_S = 1000, 50, 2.0


def grid_cell(n_ops: int, n_servers: int, shape: str, seed: int) -> dict:
    rng = random.Random(seed)
    graph = cnn_like_dag(n_ops, rng)
    cluster = SHAPES[shape](n_servers, rng)
    steps = {
        "chain DP": lambda: plan_chain(graph, cluster),
        "Pareto table": lambda: build_plan_table(graph, cluster, dag=False),
        "milp": lambda: plan_dag(graph, cluster, "latency", max_nodes=8, time_limit=MILP_TIME_LIMIT_S,
                                 max_servers=MILP_MAX_SERVERS),
        "deploy plan": lambda: plan_deployment(graph, cluster, "latency"),
    }
    cell = {"operations": len(graph.nodes), "servers": len(cluster.servers), "cut_points": len(graph.cut_points),
            "dominated": len(dominated_servers(graph, cluster)), "seconds": {}, "notes": {}}
    for step, fn in steps.items():
        try:
            cell["seconds"][step], out = timed(fn)
        except PlanError as e:  # the MILP may find nothing within its time limit
            cell["seconds"][step], cell["notes"][step] = None, str(e)
            continue
        if step == "deploy plan":
            cell["latency_ms"] = out.plans[0].latency * 1e3
            cell["plans"] = len(out.plans)
    return cell


def run_grid(args) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import scipy.optimize  # noqa: F401  the integer program imports it lazily (~0.5 s): not a planning cost

    ops = [int(x) for x in args.grid_ops.split(",")]
    servers = [int(x) for x in args.grid_servers.split(",")]
    cells = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, disable=args.json) as progress:
        task = progress.add_task("planning", total=len(ops) * len(servers))
        for n in servers:
            for m in ops:
                progress.update(task, description=f"{m} operations x {n} servers")
                cells.append(grid_cell(m, n, args.shape, args.seed))
                progress.advance(task)
    target = next((c for c in cells if c["operations"] == TARGET_OPS and c["servers"] == TARGET_SERVERS), None)
    check = None
    if target is not None and args.shape == "sites":
        secs = target["seconds"]["deploy plan"]
        check = {"operations": TARGET_OPS, "servers": TARGET_SERVERS, "deploy_plan_s": secs, "target_s": TARGET_S,
                 "met": secs is not None and secs < TARGET_S}
    return {"shape": args.shape, "seed": args.seed, "milp_time_limit_s": MILP_TIME_LIMIT_S,
            "milp_max_servers": MILP_MAX_SERVERS, "cells": cells, "check": check}


def plot_grid(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GRID_STEPS), figsize=(4.2 * len(GRID_STEPS), 3.8), sharey=True)
    servers = sorted({c["servers"] for c in result["cells"]})
    for ax, step in zip(axes, GRID_STEPS):
        for n in servers:
            row = [c for c in result["cells"] if c["servers"] == n and c["seconds"][step] is not None]
            ax.plot([c["operations"] for c in row], [c["seconds"][step] for c in row], marker="o", label=f"{n} servers")
        ax.axhline(TARGET_S, color="grey", linestyle=":", linewidth=1)
        ax.set_ylim(1e-3, 1e2)
        ax.set(xscale="log", yscale="log", title=step, xlabel="operations")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("planning time, s")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"planning time, CNN-like DAGs, servers at {'five sites' if result['shape'] == 'sites' else 'a site each'}"
                 f" (dotted: {TARGET_S:g} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_grid(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"planning time, s ({result['shape']}: servers at "
                        f"{'five sites' if result['shape'] == 'sites' else 'a site each'}; milp: 8 blocks, "
                        f"{result['milp_time_limit_s']:g} s limit, {result['milp_max_servers']} servers)")
    for col in ("operations", "servers", "cut points", "pruned", *GRID_STEPS, "latency ms"):
        table.add_column(col, justify="right")
    for c in result["cells"]:
        secs = [("-" if c["seconds"][s] is None else f"{c['seconds'][s]:.3f}") for s in GRID_STEPS]
        table.add_row(str(c["operations"]), str(c["servers"]), str(c["cut_points"]), str(c["dominated"]), *secs,
                      f"{c.get('latency_ms', float('nan')):.1f}")
    console = Console(width=max(Console().width, 120))
    console.print(table)
    if result["check"]:
        ch = result["check"]
        console.print(f"{ch['operations']} operations x {ch['servers']} servers: deploy plans in "
                      f"{ch['deploy_plan_s']:.2f} s (target under {ch['target_s']:g} s): "
                      + ("[green]met" if ch["met"] else "[red]missed"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", action="store_true", help="every step of one deploy's planning on --ops x --servers")
    ap.add_argument("--grid-ops", default="50,200,500,1000,2000")
    ap.add_argument("--grid-servers", default="3,10,50,100")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="sites")
    ap.add_argument("--plot", default="docs/plan_bench.png", help="the grid's log-log plot ('' for none)")
    ap.add_argument("--ops", type=int, default=200)
    ap.add_argument("--servers", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", default="8,12", help="coarsen the DAG to these many blocks for the MILP (comma list)")
    ap.add_argument("--time-limit", type=float, default=20.0, help="MILP time limit, seconds")
    ap.add_argument("--full-milp", action="store_true", help="also try the MILP on every operation")
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs per step")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.steps:
        result = run_grid(args)
        if args.plot:
            plot_grid(result, args.plot)
        if args.json:
            json.dump(result, sys.stdout, indent=2)
            print()
        else:
            print_grid(result)
            if args.plot:
                print(f"plot: {args.plot}")
        return 0 if not result["check"] or result["check"]["met"] else 1
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
