"""Where to cut as the device's bandwidth changes: the planner's choice against every alternative, measured.

    python benchmarks/bandwidth_sweep.py [--bandwidths 1,2,5,10,20,50,100] [--device-slowdown 10] [--edge-slowdown 3]
                                         [--remotes cloud,edge] [--reps 3] [--plot sweep.png] [--json]

MobileNetV3Large runs on three emulated sites on this machine: a device (its server's compute slowed by
`--device-slowdown`), an edge box (`--edge-slowdown`) and a cloud server (full speed). The front end, where jobs
enter and answers leave, sits at the device site (the client is the device). Link emulation delays every tensor
that crosses sites by the link's RTT and bytes / bandwidth (settings `emulate_links`, changed at run time for each
bandwidth, no restart). The device-edge bandwidth is swept; edge-cloud is fixed; device-cloud goes through the edge
(RTTs add, the narrower bandwidth counts).

Per bandwidth: the planner's plan (exact chain DP, latency objective, on the cached profile of this machine, the
speeds the servers measured and report (calibration / slowdown, as the optimizer prices them) and the broker
overhead calibrated below), its predicted and measured end-to-end latency, and the measured latency of
all-on-device, all-on-cloud and every single cut (device | remote) for each `--remotes` site. Every alternative
is deployed once; each bandwidth reuses the deployments.

Calibration, once, with every link instant: every deployment is measured; the latency that is not compute (as the
servers report it, slowdown included) is fitted as c0 + a * hops + b * bytes (least squares), and each server's
measured compute against its predicted compute gives its learned compute factor (planner.learning, what the
optimizer learns from answers), by which the planner divides its speed. a and b
become the planner's broker overhead, c0 (the client's two hops to and from the front end) is added to every
prediction. Report: table, JSON (`--json`), PNG (`--plot`). Checks from issue 5: chosen plans measured within 15% of
predicted; chosen plan within 5% of the best measured alternative. Takes several minutes; not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

MBPS = 1e6 / 8  # bytes/s per Mbit/s
PLAN_TOLERANCE = 0.15
CALIBRATION_REPS = 5  # per alternative with instant links: the overhead fit and the learned compute factors
CHOICE_TOLERANCE = 0.05
CLIENT = "frontend"  # the planner's client: the front end at the device site (it runs no part)


@dataclass
class Alternative:
    """One way to run the model: parts (server, operations) in order, deployed once, measured per bandwidth."""

    name: str
    parts: list[tuple[str, list[str]]]
    deployment: str = ""
    input_name: str = ""
    measured: dict[float, list[float]] = field(default_factory=dict)   # bandwidth -> latencies (s)
    compute: dict[float, list[float]] = field(default_factory=dict)    # bandwidth -> compute the servers reported

    @property
    def key(self) -> tuple:
        return tuple((s, frozenset(n)) for s, n in self.parts)


def sites_links(bw_mbps: float, args) -> dict[str, tuple[float, float]]:
    """'a-b' -> (rtt seconds, bandwidth bytes/s) for the emulated links at one device-edge bandwidth."""
    de = (args.device_edge_rtt_ms / 1e3, bw_mbps * MBPS)
    ec = (args.edge_cloud_rtt_ms / 1e3, args.edge_cloud_mbps * MBPS)
    return {"device-edge": de, "edge-cloud": ec, "device-cloud": (de[0] + ec[0], min(de[1], ec[1]))}


def planner_cluster(links: dict[str, tuple[float, float]], args, broker=None):
    from splitinfer.planner import BrokerOverhead, Cluster, Link, Server

    measured = getattr(args, "measured_speeds", None) or {}  # once the servers report theirs
    factor = getattr(args, "speed_factors", None) or {}     # once their answers say what compute really costs
    set_speeds = {"device": 1.0 / args.device_slowdown, "edge": 1.0 / args.edge_slowdown, "cloud": 1.0}
    servers = [
        # the front end holds the inputs; speed ~0 so no operation is placed on it
        Server(name=CLIENT, site="device", speed=1e-9),
        *(Server(name=n, site=n, speed=measured.get(n, v) / factor.get(n, 1.0)) for n, v in set_speeds.items()),
    ]
    return Cluster(servers=servers, client=CLIENT, broker=broker or BrokerOverhead(),
                   links=[Link(a=k.split("-")[0], b=k.split("-")[1], rtt=r, bandwidth=b)
                          for k, (r, b) in links.items()])


def alternatives(cost_graph, remotes: list[str], stride: int = 1) -> list[Alternative]:
    order = list(cost_graph.order)
    alts = [Alternative("all on device", [("device", order)]), Alternative("all on cloud", [("cloud", order)])]
    for remote in remotes:
        for cut in cost_graph.cut_points[::stride]:
            prefix = set(cost_graph.names_in(cost_graph.ancestor_masks[cost_graph.index[cost_graph.tensors[cut].producer]]))
            head = [n for n in order if n in prefix]
            tail = [n for n in order if n not in prefix]
            alts.append(Alternative(f"device | {remote} at {cut}", [("device", head), (remote, tail)]))
    return alts


def save_alternative(graph, cost_graph, cluster, alt: Alternative, out: Path, origin: str) -> Path:
    """Split the model as `alt` places it, each part on the runtime the cost model prices it on (as the optimizer
    saves a plan's parts), so alternatives and the optimizer's plans run alike."""
    from splitinfer.planner import make_plan
    from splitinfer.splitter import save_split_on_runtimes, split_by_groups

    plan = make_plan(cost_graph, cluster, alt.parts)
    groups = {n: k for k, (_, nodes) in enumerate(alt.parts) for n in nodes}
    save_split_on_runtimes(graph, split_by_groups(graph, groups), out, origin,
                           {f"part{k}": q.runtime for k, q in enumerate(plan.parts)})
    return out


def learned_speed_factors(cost_graph, cluster, alts: list[Alternative], part_compute: dict) -> dict[str, float]:
    """planner.learning on the calibration's answers: the alternatives as one plan table, their parts' measured
    compute as the front end would report it."""
    from splitinfer.messages import HopStat
    from splitinfer.planner import PlanTable, make_plan
    from splitinfer.planner.learning import learn

    plans = []
    for alt in alts:
        plan = make_plan(cost_graph, cluster, alt.parts)
        plan.id = alt.deployment
        plans.append(plan)
    table = PlanTable(cost_graph.name, CLIENT, [s.name for s in cluster.servers], plans, name="sweep")
    hops = [HopStat(deployment=f"sweep:{dep}", part=part, server=server, transfer_s=0.0,
                    compute_s=statistics.median(v), samples=len(v))
            for (dep, part, server), v in part_compute.items() if part.startswith("part")]
    return learn(table, cost_graph, cluster, hops, []).speed_factor


def predict(cost_graph, cluster, alt: Alternative, c0: float) -> float:
    from splitinfer.planner import evaluate

    return evaluate(cost_graph, cluster, alt.parts).latency + c0


def fit_overhead(rows: list[tuple[float, int, float]]):
    """Least squares of residual = c0 + a*hops + b*bytes, clipped at zero (a negative cost is noise)."""
    import numpy as np

    a_mat = np.array([[1.0, h, b] for _, h, b in rows])
    y = np.array([r for r, _, _ in rows])
    coef, *_ = np.linalg.lstsq(a_mat, y, rcond=None)
    return tuple(max(0.0, float(c)) for c in coef)


def hops_and_bytes(cost_graph, alt: Alternative) -> tuple[int, float]:
    """Broker hops and bytes of one request on this alternative, front end to front end."""
    hops, nbytes = 0, 0.0
    where = {n: s for s, nodes in alt.parts for n in nodes}
    for t, info in cost_graph.tensors.items():
        src = CLIENT if info.producer is None else where[info.producer]
        dests = {where[c] for c in info.consumers if where[c] != src}
        if info.is_output and src != CLIENT:
            dests.add(CLIENT)
        hops += len(dests)
        nbytes += info.nbytes * len(dests)
    return hops, nbytes


async def measured_speeds(c) -> dict[str, float]:
    from splitinfer.config import get_settings
    from splitinfer.monitor.runtime import speed_gflops

    reference = speed_gflops(get_settings().profile_cache())
    state = await c.cluster_state()
    return {a.actor_id: a.state.speed_gflops / reference / max(1.0, a.state.slowdown)
            for a in state.servers() if a.state.speed_gflops and reference}


async def run(args, console: Console) -> dict:
    import numpy as np

    from splitinfer.config import ClusterConfig
    from splitinfer.harness import ClusterRun
    from splitinfer.client import Client
    from splitinfer.monitor import profile_model
    from splitinfer.planner import BrokerOverhead, cost_graph_from_profile, plan_chain
    from splitinfer.config import get_settings
    from splitinfer.splitter import ModelGraph, load_source_model

    from splitinfer.actors.model_server.runner import configure_tf

    # profile and calibrate on the threads a server runs on (as the optimizer does): else this process's profile and
    # calibration are of another machine than the servers' reports
    configure_tf(get_settings())
    say = lambda m: console.print(m, highlight=False)  # noqa: E731
    bandwidths = [float(b) for b in args.bandwidths.split(",")]
    remotes = [r for r in args.remotes.split(",") if r]
    graph = ModelGraph(load_source_model(args.model))
    say(f"profiling {args.model} (cached after the first run)")
    profile = profile_model(graph)
    cost_graph = cost_graph_from_profile(graph, profile)  # (a floor per operation keeps them off the front end)
    alts = alternatives(cost_graph, remotes, args.cut_stride)
    default_cluster = planner_cluster(sites_links(bandwidths[0], args), args)
    by_key = {a.key: a for a in alts}
    for bw in bandwidths:  # the planner's picks with the default overhead join the set now; refitted picks later
        plan = plan_chain(cost_graph, planner_cluster(sites_links(bw, args), args), "latency")
        alt = Alternative("plan " + " > ".join(p.server for p in plan.parts), [(p.server, list(p.nodes)) for p in plan.parts])
        by_key.setdefault(alt.key, alt)
    alts = list(by_key.values())

    # the links are set by this script: no network-monitor probes competing with the measured tensors
    os.environ["SPLITINFER_PROBE_INTERVAL_S"] = "0"
    settings = get_settings().model_copy(update={"namespace": f"{get_settings().namespace}.sweep{uuid.uuid4().hex[:6]}"})
    cfg = ClusterConfig.model_validate({
        "front_end_site": "device",
        "emulate_links": True,
        "links": {k: {"rtt_ms": 0.0, "bandwidth_mbps": 1e6} for k in sites_links(1, args)},
        "servers": [
            {"id": "device", "site": "device", "slowdown": args.device_slowdown},
            {"id": "edge", "site": "edge", "slowdown": args.edge_slowdown},
            {"id": "cloud", "site": "cloud", "slowdown": 1.0},
        ],
    })
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(1, *graph.model.inputs[0].shape[1:])).astype("float32")
    local = None
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    with tempfile.TemporaryDirectory(prefix="splitinfer-sweep-") as tmp:
        async with ClusterRun(3, settings, say, config=cfg) as cluster:
            async with Client(cluster.settings) as c:
                await c.wait_for_servers(3, timeout=120)
                # the planner prices each server as it measured itself: calibrated GFLOP/s over this machine's,
                # divided by its slowdown (as the optimizer does), not the slowdowns given on the command line
                args.measured_speeds = await measured_speeds(c)
                say("servers' measured speeds (x this machine): " +
                    ", ".join(f"{k} {v:.3f}" for k, v in sorted(args.measured_speeds.items())))
                with progress:
                    task = progress.add_task("split and deploy", total=len(alts))
                    splits: dict[tuple, Path] = {}
                    for i, alt in enumerate(alts):
                        cut_key = tuple(frozenset(n) for _, n in alt.parts)
                        if cut_key not in splits:
                            out = Path(tmp) / f"s{len(splits)}"
                            await asyncio.to_thread(save_alternative, graph, cost_graph, default_cluster, alt, out,
                                                    args.model)
                            splits[cut_key] = out
                        # a name per alternative: the same split under its split id on other servers would only add
                        # replicas to one deployment, and requests would hash across both placements
                        dep = await c.deploy(splits[cut_key], {f"part{k}": s for k, (s, _) in enumerate(alt.parts)},
                                             deployment=f"alt{i}", timeout=600)
                        alt.deployment, alt.input_name = dep.deployment, dep.inputs[0]
                        progress.advance(task)
                if local is None:
                    from splitinfer.harness import local_runner

                    first = next(iter(alts))
                    local = await asyncio.to_thread(
                        lambda: local_runner(next(iter(splits.values())))({first.input_name: x}))

                part_compute: dict[tuple[str, str, str], list[float]] = {}  # (deployment, part, server) -> s

                async def measure(alt: Alternative, bw: float, reps: int) -> None:
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        r = await c.infer(alt.deployment, {alt.input_name: x}, deadline_s=120)
                        alt.measured.setdefault(bw, []).append(time.perf_counter() - t0)
                        alt.compute.setdefault(bw, []).append(sum(h.compute_s for h in r.hops))
                        for h in r.hops:
                            part_compute.setdefault((alt.deployment, h.part, h.server), []).append(h.compute_s)
                        err = max(float(np.max(np.abs(np.asarray(r.outputs[k]) - np.asarray(v))))
                                  for k, v in local.items() if k in r.outputs)
                        if err > 1e-4:
                            raise RuntimeError(f"{alt.name}: max error {err} against the local model")

                # calibration: emulation on but every link instant -> residual = broker + front-end overhead
                await c.set_links({k: (0.0, 1e6 * MBPS) for k in sites_links(1, args)})
                with progress:
                    task = progress.add_task("calibrate broker overhead", total=len(alts))
                    rows, calibration_rows = [], []
                    flat = planner_cluster({k: (0.0, 1e12) for k in sites_links(1, args)}, args,
                                           BrokerOverhead(per_message=0.0, per_byte=0.0))
                    for alt in alts:
                        await measure(alt, 0.0, CALIBRATION_REPS)
                        hops, nbytes = hops_and_bytes(cost_graph, alt)
                        # what is neither compute (as the servers measured it) nor link delay (none here)
                        residual = min(m - c for m, c in zip(alt.measured[0.0], alt.compute[0.0]))
                        rows.append((residual, hops, nbytes))
                        calibration_rows.append({"alternative": alt.name, "measured_ms": min(alt.measured[0.0]) * 1e3,
                                                 "compute_predicted_ms": predict(cost_graph, flat, alt, 0.0) * 1e3,
                                                 "compute_measured_ms": min(alt.compute[0.0]) * 1e3,
                                                 "hops": hops, "bytes": nbytes})
                        progress.advance(task)
                c0, per_message, per_byte = fit_overhead(rows)
                broker = BrokerOverhead(per_message=per_message, per_byte=per_byte)
                # what the servers' compute really costs against the profile (as the optimizer learns it from the
                # answers): each server's speed divided by its measured / predicted compute
                args.speed_factors = learned_speed_factors(cost_graph, flat, alts, part_compute)
                say("learned compute factors (measured / predicted): " +
                    ", ".join(f"{k} {v:.3f}" for k, v in sorted(args.speed_factors.items())))
                say(f"calibrated: client hops {c0 * 1e3:.2f} ms, per hop {per_message * 1e3:.2f} ms + "
                    f"{per_byte * 1e9:.2f} ms/MB")

                results = []
                with progress:
                    task = progress.add_task("sweep", total=len(bandwidths) * len(alts))
                    for bw in bandwidths:
                        links = sites_links(bw, args)
                        cluster_bw = planner_cluster(links, args, broker)
                        plan = plan_chain(cost_graph, cluster_bw, "latency")
                        key = tuple((p.server, frozenset(p.nodes)) for p in plan.parts)
                        chosen = by_key.get(key)
                        if chosen is None:  # the refitted overhead picked something new: deploy it now
                            chosen = Alternative("plan " + " > ".join(p.server for p in plan.parts),
                                                 [(p.server, list(p.nodes)) for p in plan.parts])
                            out = Path(tmp) / f"s{len(splits)}"
                            await asyncio.to_thread(save_alternative, graph, cost_graph, cluster_bw, chosen, out,
                                                    args.model)
                            dep = await c.deploy(out, {f"part{k}": s for k, (s, _) in enumerate(chosen.parts)},
                                                 deployment=f"alt{len(alts)}", timeout=600)
                            chosen.deployment, chosen.input_name = dep.deployment, dep.inputs[0]
                            by_key[key] = chosen
                            alts.append(chosen)
                        await c.set_links(links)
                        predicted = {a.name: predict(cost_graph, cluster_bw, a, c0) for a in alts}
                        best_predicted = min(predicted.values())
                        for alt in sorted(alts, key=lambda a: predicted[a.name]):
                            near = predicted[alt.name] <= 1.5 * best_predicted or alt is chosen
                            await measure(alt, bw, args.reps if near else 1)
                            progress.advance(task)
                        med = {a.name: statistics.median(a.measured[bw]) for a in alts}
                        singles = {n: v for n, v in med.items() if " | " in n}
                        best_name = min(med, key=med.get)
                        row = {
                            "bandwidth_mbps": bw,
                            "plan": chosen.name,
                            "plan_cuts": plan.cuts,
                            "plan_predicted_ms": predicted[chosen.name] * 1e3,
                            "plan_measured_ms": med[chosen.name] * 1e3,
                            "all_device_ms": med["all on device"] * 1e3,
                            "all_cloud_ms": med["all on cloud"] * 1e3,
                            "best_single_cut": min(singles, key=singles.get) if singles else None,
                            "best_single_cut_ms": min(singles.values()) * 1e3 if singles else None,
                            "best_measured": best_name,
                            "best_measured_ms": med[best_name] * 1e3,
                            "single_cuts_ms": {n: v * 1e3 for n, v in singles.items()},
                        }
                        row["prediction_error"] = row["plan_measured_ms"] / row["plan_predicted_ms"] - 1
                        row["plan_vs_best"] = row["plan_measured_ms"] / row["best_measured_ms"] - 1
                        results.append(row)
    return {
        "model": args.model,
        "device_slowdown": args.device_slowdown, "edge_slowdown": args.edge_slowdown,
        "device_edge_rtt_ms": args.device_edge_rtt_ms, "edge_cloud_rtt_ms": args.edge_cloud_rtt_ms,
        "edge_cloud_mbps": args.edge_cloud_mbps, "reps": args.reps,
        "measured_speeds": args.measured_speeds, "learned_speed_factors": args.speed_factors,
        "calibration": {"client_hops_ms": c0 * 1e3, "per_hop_ms": per_message * 1e3, "per_mb_ms": per_byte * 1e9},
        "calibration_rows": calibration_rows,
        "alternatives": len(alts),
        "rows": results,
        "checks": {
            "plans_within_15pct_of_prediction": all(abs(r["prediction_error"]) <= PLAN_TOLERANCE for r in results),
            "plans_within_5pct_of_best_measured": all(r["plan_vs_best"] <= CHOICE_TOLERANCE for r in results),
        },
    }


def print_report(r: dict, console: Console) -> None:
    t = Table(title=f"{r['model'].split(':')[-1]}: device x{r['device_slowdown']:g}, edge x{r['edge_slowdown']:g}, "
                    f"cloud x1; device-edge RTT {r['device_edge_rtt_ms']:g} ms, edge-cloud "
                    f"{r['edge_cloud_mbps']:g} Mbps / {r['edge_cloud_rtt_ms']:g} ms (medians, ms)")
    for col in ("Mbps", "plan", "predicted", "measured", "error", "all device", "all cloud", "best single cut",
                "plan vs best"):
        t.add_column(col, justify="left" if col in ("plan", "best single cut") else "right")
    for row in r["rows"]:
        t.add_row(f"{row['bandwidth_mbps']:g}", row["plan"].replace("plan ", ""),
                  f"{row['plan_predicted_ms']:.1f}", f"{row['plan_measured_ms']:.1f}",
                  f"{row['prediction_error']:+.0%}", f"{row['all_device_ms']:.1f}", f"{row['all_cloud_ms']:.1f}",
                  f"{row['best_single_cut_ms']:.1f} ({row['best_single_cut'].split(' at ')[-1]})"
                  if row["best_single_cut"] else "-",
                  f"{row['plan_vs_best']:+.0%}")
    console.print(t)
    cal = r["calibration"]
    console.print(f"broker overhead fitted: {cal['per_hop_ms']:.2f} ms per hop + {cal['per_mb_ms']:.2f} ms/MB, "
                  f"client hops {cal['client_hops_ms']:.2f} ms; {r['alternatives']} alternatives measured")
    for name, ok in r["checks"].items():
        console.print(f"check {name}: {'[green]met[/]' if ok else '[red]missed[/]'}")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    bw = [row["bandwidth_mbps"] for row in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        ys = list(row["single_cuts_ms"].values())
        ax.scatter([row["bandwidth_mbps"]] * len(ys), ys, s=6, color="0.75", zorder=1)
    ax.scatter([], [], s=6, color="0.75", label="every single cut (measured)")
    ax.plot(bw, [row["all_device_ms"] for row in rows], "s-", label="all on device (measured)")
    ax.plot(bw, [row["all_cloud_ms"] for row in rows], "^-", label="all on cloud (measured)")
    ax.plot(bw, [row["plan_predicted_ms"] for row in rows], "k--", label="planner's plan (predicted)")
    ax.plot(bw, [row["plan_measured_ms"] for row in rows], "ko-", label="planner's plan (measured)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("device-edge bandwidth (Mbit/s)")
    ax.set_ylabel("end-to-end latency (ms, median)")
    ax.set_title(f"{r['model'].split(':')[-1]}: planner vs alternatives on emulated links")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="keras.applications:MobileNetV3Large")
    ap.add_argument("--bandwidths", default="1,2,5,10,20,50,100", help="device-edge Mbit/s, comma-separated")
    add_site_arguments(ap)
    ap.add_argument("--remotes", default="cloud,edge", help="sites that take the rest after a single cut")
    ap.add_argument("--cut-stride", type=int, default=1, help="every Nth cut point only (quick runs); 1: every cut")
    ap.add_argument("--reps", type=int, default=3, help="runs per alternative near the best (others: 1)")
    run_and_report(ap, run, print_report, plot)


def add_site_arguments(ap: argparse.ArgumentParser) -> None:
    """The emulated device / edge / cloud sites (this benchmark's and adaptive.py's)."""
    ap.add_argument("--device-slowdown", type=float, default=10.0)
    ap.add_argument("--edge-slowdown", type=float, default=3.0)
    ap.add_argument("--device-edge-rtt-ms", type=float, default=5.0)
    ap.add_argument("--edge-cloud-rtt-ms", type=float, default=5.0)
    ap.add_argument("--edge-cloud-mbps", type=float, default=1000.0)


def run_and_report(ap: argparse.ArgumentParser, run, print_report, plot) -> None:
    """Parse (adding --plot and --json), run, then the plot and the JSON or the table."""
    ap.add_argument("--plot", type=Path, default=None, help="write the figure (PNG) here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    console = Console(stderr=args.json)
    report = asyncio.run(run(args, console))
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, console)
        if args.plot:
            console.print(f"plot: {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
