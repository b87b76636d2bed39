"""Local compiled vs distributed inference, measured in the same run: MobileNetV3Large in 1, 2 and 5 parts.

    python benchmarks/e2e_bench.py [--model keras.applications:NAME] [--parts 1,2,5] [--jobs 30]
                                   [--concurrency 8] [--servers 5] [--json]

One cluster (supervisor, registry, model pool, result store, front end, `--servers` model-server processes) is
started in a fresh namespace, on the configured broker or a private one it starts. Each split is deployed onto it
(round-robin), then, per split: `--jobs` jobs one at a time through the Client and the front end (latency median
and p99 as the client sees it) and the same jobs with `--concurrency` in flight (throughput). The local baseline is
the unsplit model as one compiled tf.function in this process, on the same inputs. Targets from issue 4: 5-part
latency at most 1.3x local compiled; throughput at concurrency 8 at least local sequential throughput.
Not run in CI (it takes a few minutes); quick defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from splitinfer.harness import (
    ClusterRun,
    hop_summary,
    local_runner,
    make_split,
    max_abs_error,
    measure_distributed,
    measure_local,
    percentile,
)
from splitinfer.client import Client
from splitinfer.config import get_settings

LATENCY_TARGET = 1.3


async def run(args, say) -> dict:
    import numpy as np

    settings = get_settings().model_copy(update={"namespace": f"{get_settings().namespace}.bench{uuid.uuid4().hex[:6]}"})
    parts_list = [int(p) for p in args.parts.split(",")]
    with tempfile.TemporaryDirectory(prefix="splitinfer-bench-") as tmp:
        say(f"splitting {args.model} into {parts_list} parts and starting {args.servers} servers")
        # one after another (Keras model building is not thread-safe), in the background of the cluster start
        splitting = asyncio.create_task(asyncio.to_thread(
            lambda: {n: make_split(args.model, n, Path(tmp) / f"p{n}") for n in parts_list}))
        async with ClusterRun(args.servers, settings, say) as cluster:
            manifests = await splitting
            first = manifests[parts_list[0]]
            shape = [1 if d is None else d for d in first.inputs[0].shape]
            rng = np.random.default_rng(0)
            xs = [rng.uniform(0, 1, size=shape).astype(first.inputs[0].dtype) for _ in range(args.jobs)]
            rows = {}
            async with Client(cluster.settings) as c:
                for n in parts_list:
                    dep = await c.deploy(Path(tmp) / f"p{n}", min_servers=args.servers, timeout=600)
                    say(f"{n} part(s) deployed as {dep.deployment}: "
                        + ", ".join(f"{p}->{s[0]}" for p, s in dep.placement.items()))
                    input_name = dep.inputs[0]
                    await measure_distributed(c, dep.deployment, xs[:3], input_name, 1)  # warm-up
                    seq = await measure_distributed(c, dep.deployment, xs, input_name, 1)
                    par = await measure_distributed(c, dep.deployment, xs, input_name, args.concurrency)
                    rows[n] = {"seq": seq, "par": par, "deployment": dep.deployment}
            say("local compiled baseline on the same inputs")
            local = await asyncio.to_thread(lambda: measure_local(local_runner(Path(tmp) / f"p{parts_list[0]}"),
                                                                  xs, first.inputs[0].name))
    loc_med = percentile(local["latency"], 50) * 1e3
    report = {
        "model": args.model, "jobs": args.jobs, "concurrency": args.concurrency, "servers": args.servers,
        "local": {"latency_median_ms": loc_med, "latency_p99_ms": percentile(local["latency"], 99) * 1e3,
                  "throughput_per_s": local["throughput"]},
        "distributed": {},
    }
    for n, r in rows.items():
        med = percentile(r["seq"]["latency"], 50) * 1e3
        report["distributed"][str(n)] = {
            "deployment": r["deployment"],
            "latency_median_ms": med,
            "latency_p99_ms": percentile(r["seq"]["latency"], 99) * 1e3,
            "latency_vs_local": med / loc_med,
            "throughput_per_s": r["par"]["throughput"],
            "throughput_c1_per_s": r["seq"]["throughput"],
            "max_abs_error": max(max_abs_error(r["seq"]["results"], local["outputs"]),
                                 max_abs_error(r["par"]["results"], local["outputs"])),
            "hops": hop_summary(r["seq"]["results"], r["seq"]["latency"]),
        }
    last = report["distributed"].get("5")
    if last is not None:
        report["targets"] = {
            "latency_5_parts_at_most_1.3x_local": last["latency_vs_local"] <= LATENCY_TARGET,
            "throughput_c8_at_least_local_sequential": last["throughput_per_s"] >= report["local"]["throughput_per_s"],
        }
    return report


def print_report(r: dict, console: Console) -> None:
    t = Table(title=f"{r['model'].split(':')[-1]}: local compiled vs distributed ({r['jobs']} jobs, "
                    f"{r['servers']} server processes)")
    for col in ("run", "latency median ms", "p99 ms", "vs local", f"throughput /s c={r['concurrency']}",
                "max abs error"):
        t.add_column(col, justify="left" if col == "run" else "right")
    loc = r["local"]
    t.add_row("local compiled", f"{loc['latency_median_ms']:.1f}", f"{loc['latency_p99_ms']:.1f}", "1.00x",
              f"{loc['throughput_per_s']:.1f} (sequential)", "-")
    for n, d in r["distributed"].items():
        t.add_row(f"distributed, {n} part{'s' if n != '1' else ''}", f"{d['latency_median_ms']:.1f}",
                  f"{d['latency_p99_ms']:.1f}", f"{d['latency_vs_local']:.2f}x", f"{d['throughput_per_s']:.1f}",
                  f"{d['max_abs_error']:.1e}")
    console.print(t)
    for name, ok in r.get("targets", {}).items():
        console.print(f"target {name}: {'[green]met[/]' if ok else '[red]missed[/]'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="keras.applications:MobileNetV3Large")
    ap.add_argument("--parts", default="1,2,5", help="comma-separated part counts")
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--servers", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    console = Console(stderr=args.json)
    report = asyncio.run(run(args, lambda m: console.print(m, highlight=False)))
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, console)


if __name__ == "__main__":
    sys.exit(main())
