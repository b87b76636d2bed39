"""The plan follows the link: run-time re-planning while the device's bandwidth changes, measured.

    python benchmarks/adaptive.py [--model keras.applications:MobileNetV3Large] [--phases 100:60,5:60,50:60]
                                  [--device-slowdown 10] [--edge-slowdown 3] [--max-plans 1] [--cut-stride 8]
                                  [--plot adaptive.png] [--json]

A device (its compute slowed `--device-slowdown` times), an edge box and a cloud server run on emulated links on
this machine, as in bandwidth_sweep.py; the front end (where jobs enter) is on the device. The model is deployed
through the optimizer (`--max-plans`, 1 by default, so that the table holds only what suits the first link and a
better plan has to be made, not merely chosen). Jobs then run one after another for the whole run while the
device-edge bandwidth moves through `--phases` (Mbit/s:seconds each). Nothing tells the optimizer: the network
monitors measure the links, the optimizer re-plans on what they measure (settings adaptive_replanning, replan_*).

Per phase: the plans jobs ran on, the stream's latency median once the last plan change of the phase took effect,
the time from the bandwidth change until the first job ran on a new plan, the optimizer's logged changes (with
its before/after predictions), the cost model's prediction error (from the monitors alone and with the learned
costs), and, measured at the end of the phase one after another in the same way (a warm-up job, then `--reps`),
the plan in use and every alternative (all on device, all on cloud, single cuts every `--cut-stride` cut points
to edge and cloud, each part on the runtime the cost model prices it on), so that the re-planned plan is compared
with the best way to run the model at that bandwidth (check: within 10%). A plot (`--plot`) shows
every job's latency over time, the bandwidth changes and the plan changes. Several minutes; not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bandwidth_sweep import (
    MBPS,
    add_site_arguments,
    alternatives,
    planner_cluster,
    run_and_report,
    save_alternative,
    sites_links,
)

BEST_TOLERANCE = 0.10
NAME = "adaptive"


def replan_env(args) -> dict[str, str]:
    """How quickly the cluster notices and reacts: probes and re-plans every `--check-s`."""
    return {"SPLITINFER_PROBE_INTERVAL_S": str(args.check_s), "SPLITINFER_REPLAN_INTERVAL_S": str(args.check_s),
            "SPLITINFER_REPLAN_HOLD": str(args.hold), "SPLITINFER_REPLAN_COOLDOWN_S": str(args.cooldown_s),
            "SPLITINFER_REPLAN_THRESHOLD": str(args.threshold), "SPLITINFER_ADAPTIVE_REPLANNING": "true"}


async def run(args, console: Console) -> dict:
    from splitinfer.actors.transport.log import read_log_events
    from splitinfer.client import Client
    from splitinfer.config import ClusterConfig, get_settings
    from splitinfer.harness import ClusterRun
    from splitinfer.monitor import profile_model
    from splitinfer.planner import cost_graph_from_profile
    from splitinfer.splitter import ModelGraph, load_source_model

    from splitinfer.actors.model_server.runner import configure_tf

    configure_tf(get_settings())  # profile on the threads a server runs on, as the optimizer does
    say = lambda m: console.print(m, highlight=False)  # noqa: E731
    phases = [(float(b), float(s)) for b, s in (p.split(":") for p in args.phases.split(","))]
    os.environ.update(replan_env(args))
    graph = ModelGraph(load_source_model(args.model))
    cost_graph = cost_graph_from_profile(graph, profile_model(graph))
    alts = alternatives(cost_graph, ["cloud", "edge"], args.cut_stride)
    x = np.random.default_rng(0).uniform(0, 1, size=(1, *graph.model.inputs[0].shape[1:])).astype("float32")
    reference = np.asarray(graph.model(x, training=False))

    settings = get_settings().model_copy(update={"namespace": f"{get_settings().namespace}.adapt{uuid.uuid4().hex[:6]}"})
    first_links = sites_links(phases[0][0], args)
    cfg = ClusterConfig.model_validate({
        "front_end_site": "device", "emulate_links": True,
        "links": {k: {"rtt_ms": r * 1e3, "bandwidth_mbps": b / MBPS} for k, (r, b) in first_links.items()},
        "servers": [{"id": "device", "site": "device", "slowdown": args.device_slowdown},
                    {"id": "edge", "site": "edge", "slowdown": args.edge_slowdown},
                    {"id": "cloud", "site": "cloud", "slowdown": 1.0}],
    })
    jobs: list[dict] = []        # every job: start (s since the run began), latency, plan
    phase_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="splitinfer-adapt-") as tmp:
        async with ClusterRun(3, settings, say, config=cfg) as cluster:
            log = cluster.sup.run_dir / "logs" / "optimizer.log"
            async with Client(cluster.settings) as c:
                await c.wait_for_servers(3, timeout=120)
                # the alternatives first: deploying them loads the machine, which the optimizer would see
                say(f"deploying {len(alts)} alternatives to measure against")
                priced = planner_cluster(first_links, args)
                for i, alt in enumerate(alts):
                    out = await asyncio.to_thread(save_alternative, graph, cost_graph, priced, alt, Path(tmp) / f"s{i}",
                                                  args.model)
                    dep = await c.deploy(out, {f"part{k}": s for k, (s, _) in enumerate(alt.parts)},
                                         deployment=f"alt{i}", timeout=600)
                    alt.deployment, alt.input_name = dep.deployment, dep.inputs[0]
                say(f"deploying {args.model} through the optimizer (max {args.max_plans} plan(s))")
                reply = await c.deploy_model(args.model, NAME, max_plans=args.max_plans, timeout=900)
                say(f"deployed: {reply['table']['primary']} "
                    f"{[p['parts'][0]['server'] for p in reply['table']['plans']]}")

                t_start, wall_start = time.monotonic(), time.time()

                async def job(deployment: str, inputs) -> tuple[float, str | None]:
                    t0 = time.perf_counter()
                    r = await c.infer(deployment, inputs, deadline_s=120)
                    got = np.asarray(next(iter(r.outputs.values())))
                    err = float(np.max(np.abs(got - reference)))
                    if err > 1e-4:
                        raise RuntimeError(f"{deployment}: max error {err} against the local model")
                    return time.perf_counter() - t0, r.plan

                progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                    console=console, transient=True)
                with progress:
                    for k, (bw, hold_s) in enumerate(phases):
                        task = progress.add_task(f"phase {k + 1}: {bw:g} Mbit/s", total=hold_s)
                        if k:
                            await c.set_links(sites_links(bw, args))
                        changed_at = time.monotonic() - t_start
                        plan_at_change = jobs[-1]["plan"] if jobs else None
                        while time.monotonic() - t_start - changed_at < hold_s:
                            t0 = time.monotonic() - t_start
                            latency, plan = await job(NAME, x)
                            jobs.append({"t": t0, "latency_ms": latency * 1e3, "plan": plan, "phase": k})
                            progress.update(task, completed=min(hold_s, time.monotonic() - t_start - changed_at))
                        mine = [j for j in jobs if j["phase"] == k]
                        last_plan = mine[-1]["plan"]
                        since = max((i for i, j in enumerate(mine) if j["plan"] != last_plan), default=-1) + 1
                        # adapted: from the change until jobs run, for good, on the plan that ends the phase
                        switch = mine[since] if k and last_plan != plan_at_change else None
                        steady = [j["latency_ms"] for j in mine[since:]]
                        # the best way to run the model at this bandwidth, measured now
                        measured = {}
                        for alt in alts:
                            await job(alt.deployment, {alt.input_name: x})  # warm: idle parts answer slowly once
                            measured[alt.name] = statistics.median(
                                [(await job(alt.deployment, {alt.input_name: x}))[0] * 1e3 for _ in range(args.reps)])
                        # the plan in use, measured the same way right after (its deployment `<name>:<plan>`)
                        await job(f"{NAME}:{last_plan}", x)
                        plan_ms = statistics.median(
                            [(await job(f"{NAME}:{last_plan}", x))[0] * 1e3 for _ in range(args.reps)])
                        best = min(measured, key=measured.get)
                        phase_rows.append({
                            "bandwidth_mbps": bw, "seconds": hold_s, "jobs": len(mine), "changed_at_s": changed_at,
                            "plans": list(dict.fromkeys(j["plan"] for j in mine)), "plan": last_plan,
                            "latency_median_ms": statistics.median(steady),
                            "steady_jobs": len(steady),
                            "switch_after_s": (switch["t"] - changed_at) if switch else None,
                            "best_alternative": best, "best_alternative_ms": measured[best],
                            "plan_measured_ms": plan_ms,
                            "vs_best": plan_ms / measured[best] - 1,
                            "stream_vs_best": statistics.median(steady) / measured[best] - 1,
                            "alternatives_ms": measured,
                        })
                events = read_log_events(log)
                changes = [e for e in events if e.get("event") in ("replanned", "retired", "replan_failed")]
                errors = [{"at_s": e["t"] - wall_start, "plan": pid, **{k: v for k, v in fig.items()}}
                          for e in events if e.get("event") == "costs_learned" and e["t"] >= wall_start
                          for pid, fig in e["plans"].items()]
                table = await c.plan_table(NAME)
    t_changes = [{"at_s": e["t"] - wall_start, **{k: v for k, v in e.items() if k not in ("t", "level", "actor", "kind")}}
                 for e in changes]
    return {
        "model": args.model, "phases": phase_rows, "jobs": jobs, "changes": t_changes,
        # the cost model's prediction error over time (ms; the optimizer's costs_learned events): each plan's
        # measured median latency, its prediction from the monitors alone, and with the learned costs
        "prediction_errors": errors,
        "final_table": [{"id": p["id"], "route": " -> ".join(q["server"] for q in p["parts"]),
                         "predicted_ms": p["latency"] * 1e3} for p in table["plans"]],
        "settings": {"device_slowdown": args.device_slowdown, "edge_slowdown": args.edge_slowdown,
                     "device_edge_rtt_ms": args.device_edge_rtt_ms, "edge_cloud_rtt_ms": args.edge_cloud_rtt_ms,
                     "edge_cloud_mbps": args.edge_cloud_mbps, "max_plans": args.max_plans, **replan_env(args)},
        "checks": {"replanned_within_10pct_of_best": all(r["vs_best"] <= BEST_TOLERANCE for r in phase_rows)},
    }


def print_report(r: dict, console: Console) -> None:
    st = r["settings"]
    t = Table(title=f"{r['model'].split(':')[-1]}: device x{st['device_slowdown']:g}, edge x{st['edge_slowdown']:g}, "
                    f"cloud x1; device-edge bandwidth changes during the run (medians, ms)")
    for col in ("Mbit/s", "plans run", "plan at the end", "stream latency", "adapted after", "plan measured",
                "best alternative", "vs best"):
        t.add_column(col, justify="left" if col in ("plans run", "plan at the end", "best alternative") else "right")
    for row in r["phases"]:
        t.add_row(f"{row['bandwidth_mbps']:g}", ", ".join(str(p) for p in row["plans"]), str(row["plan"]),
                  f"{row['latency_median_ms']:.1f}",
                  "-" if row["switch_after_s"] is None else f"{row['switch_after_s']:.1f} s",
                  f"{row['plan_measured_ms']:.1f}",
                  f"{row['best_alternative_ms']:.1f} ({row['best_alternative']})", f"{row['vs_best']:+.0%}")
    console.print(t)
    for e in r["changes"]:
        if e["event"] == "replanned":
            console.print(f"  {e['at_s']:6.1f} s  replanned {e['plan']}: {e['before']} ({e['before_latency_ms']:.1f} ms "
                          f"predicted) -> {e['after']} ({e['after_latency_ms']:.1f} ms), deployed in {e['seconds']:.1f} s")
        else:
            console.print(f"  {e['at_s']:6.1f} s  {e['event']}: {e.get('plans') or e.get('error')}")
    for row in r["phases"]:
        lo, hi = row["changed_at_s"], row["changed_at_s"] + row["seconds"]
        errs = [e for e in r["prediction_errors"] if lo <= e["at_s"] < hi and e["plan"] == row["plan"]]
        if errs:
            base = statistics.median(abs(e["predicted_base"] / e["measured"] - 1) for e in errs)
            learned = statistics.median(abs(e["predicted_learned"] / e["measured"] - 1) for e in errs)
            console.print(f"  {row['bandwidth_mbps']:g} Mbit/s, plan {row['plan']}: prediction error {base:.0%} from "
                          f"the monitors alone, {learned:.0%} with the learned costs ({len(errs)} checks)")
    for name, ok in r["checks"].items():
        console.print(f"check {name}: {'[green]met[/]' if ok else '[red]missed[/]'}")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_err) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    plans = list(dict.fromkeys(j["plan"] for j in r["jobs"]))
    for i, plan in enumerate(plans):
        js = [j for j in r["jobs"] if j["plan"] == plan]
        ax.scatter([j["t"] for j in js], [j["latency_ms"] for j in js], s=8, color=f"C{i}", label=f"jobs on {plan}")
    top = max(j["latency_ms"] for j in r["jobs"])
    for row in r["phases"]:
        ax.axvline(row["changed_at_s"], color="0.3", ls="--", lw=1)
        ax.text(row["changed_at_s"], top * 1.05, f" {row['bandwidth_mbps']:g} Mbit/s", fontsize=8, va="bottom")
        end = row["changed_at_s"] + row["seconds"]
        ax.hlines(row["best_alternative_ms"], row["changed_at_s"], end, colors="k", lw=1.5,
                  label="best alternative (measured)" if row is r["phases"][0] else None)
    for e in r["changes"]:
        if e["event"] == "replanned":
            ax.axvline(e["at_s"], color="C3", lw=1, alpha=0.7)
            ax.text(e["at_s"], top * 0.9, f" {e['plan']}", color="C3", fontsize=8)
    def in_use(e: dict) -> bool:  # the plan the stream ran on when the optimizer checked
        before = [j for j in r["jobs"] if j["t"] <= e["at_s"]]
        return bool(before) and before[-1]["plan"] == e["plan"]

    es = [e for e in r["prediction_errors"] if in_use(e)]
    for key, style, label in (("predicted_base", "x", "monitors alone"), ("predicted_learned", "o", "learned costs")):
        ax_err.plot([e["at_s"] for e in es], [100 * (e[key] / e["measured"] - 1) for e in es], style, ms=3, label=label)
    ax_err.axhline(0, color="0.5", lw=0.8)
    ax_err.set_ylabel("prediction error of\nthe plan in use (%)")
    ax_err.set_xlabel("time since the first job (s)")
    ax_err.grid(True, alpha=0.3)
    ax_err.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title(f"{r['model'].split(':')[-1]}: the plan follows the device-edge bandwidth\n"
                 f"(dashed: bandwidth change, red: a new plan deployed)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="keras.applications:MobileNetV3Large")
    ap.add_argument("--phases", default="100:60,5:60,50:60", help="device-edge Mbit/s:seconds, comma-separated")
    add_site_arguments(ap)
    ap.add_argument("--max-plans", type=int, default=1, help="plans the deploy keeps (1: every better plan is made)")
    ap.add_argument("--cut-stride", type=int, default=8, help="alternatives: every Nth cut point")
    ap.add_argument("--reps", type=int, default=5, help="runs per alternative (and the plan in use) per phase")
    ap.add_argument("--check-s", type=float, default=2.0, help="probe and re-plan interval")
    ap.add_argument("--hold", type=int, default=2)
    ap.add_argument("--cooldown-s", type=float, default=10.0)
    ap.add_argument("--threshold", type=float, default=0.15)
    run_and_report(ap, run, print_report, plot)


if __name__ == "__main__":
    sys.exit(main())
