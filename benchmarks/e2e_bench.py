"""Local compiled vs distributed inference, measured in the same run, with the bare broker's hop beside it.

    python benchmarks/e2e_bench.py [--model keras.applications:NAME] [--parts 1,5] [--jobs 60] [--concurrency 8]
                                   [--servers 5] [--skip-colocated] [--skip-batching] [--json]

One cluster (supervisor, registry, model pool, result store, front end, `--servers` model-server processes) is
started in a fresh namespace, on the configured broker or a private one it starts. Per split in `--parts`, deployed
round-robin (one part per server process): `--jobs` jobs one at a time through the Client (latency median and
p99 as the client sees it) and the same jobs with `--concurrency` in flight (throughput). The local baseline is
the unsplit model as one compiled tf.function in this process, on the same inputs, one job after another.

Beside it, in the same run:
- the bare-broker floor: a plain aio-pika publish and consume between this process and an echo process, at the
  size of every tensor the 5-part split hands over (one way = half the round trip, median), and each splitinfer
  hop's transfer time as a ratio of it;
- co-located variants: the 5 parts on 1 and on 2 server processes (consecutive parts in one process run back to
  back, no broker hop between them) against 1 part on 1 process;
- batching: the 5-part split at `--concurrency` with batching on (the servers' default: what is ready when the
  worker is free), off (max batch 1), and with a 2 ms batch delay (each on a cluster of its own), and the batch
  sizes that formed.
`--json` keeps `local.latency_median_ms`, `local.throughput_per_s`, and per split `distributed["<n>"]` with
`latency_vs_local`, `throughput_per_s`, `max_abs_error`; `distributed["5"]` is 5 parts on 5 server processes.
Not run in CI (a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import numpy as np
from rich.console import Console
from rich.table import Table

from splitinfer.client import Client
from splitinfer.config import get_settings
from splitinfer.harness import (
    ClusterRun,
    local_runner,
    make_split,
    measure_local,
    percentile,
    run_split,
    summarize,
)
from splitinfer.splitter.manifest import Manifest

ECHO = """
import asyncio, sys, aio_pika
async def main(url, inbox, outbox):
    conn = await aio_pika.connect(url)
    ch = await conn.channel()
    q = await ch.declare_queue(inbox, auto_delete=True)
    async def echo(m):
        await ch.default_exchange.publish(aio_pika.Message(m.body), routing_key=outbox)
    await q.consume(echo, no_ack=True)
    print("ready", flush=True)
    await asyncio.Future()
asyncio.run(main(*sys.argv[1:4]))
"""


async def broker_floor(url: str, sizes: list[int], rounds: int = 60) -> dict[int, float]:
    """One way through the broker for a message of each size, in seconds (median of half round trips): plain
    aio-pika publish and consume between this process and an echo process, no confirms, no validation."""
    tag = uuid.uuid4().hex[:8]
    inbox, outbox = f"floor.{tag}.echo", f"floor.{tag}.back"
    conn = await aio_pika.connect(url)
    ch = await conn.channel()
    back = await ch.declare_queue(outbox, auto_delete=True)
    echo = subprocess.Popen([sys.executable, "-c", ECHO, url, inbox, outbox], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout.readline().strip() == "ready"
        got: asyncio.Queue = asyncio.Queue()
        await back.consume(lambda m: got.put_nowait(time.perf_counter()), no_ack=True)
        out = {}
        for size in sizes:
            body = os.urandom(size)
            times = []
            for i in range(rounds + 5):
                t0 = time.perf_counter()
                await ch.default_exchange.publish(aio_pika.Message(body), routing_key=inbox)
                t1 = await got.get()
                if i >= 5:
                    times.append((t1 - t0) / 2)
            out[size] = float(np.median(times))
        return out
    finally:
        echo.terminate()
        echo.wait(10)
        await conn.close()


def hop_sizes(manifest: Manifest) -> dict[str, int]:
    """Bytes each part receives (its inputs at batch 1) and the answer's bytes."""
    def nbytes(t) -> int:
        return int(np.prod([d or 1 for d in t.shape])) * np.dtype(t.dtype).itemsize

    sizes = {p.name: sum(nbytes(t) for t in p.inputs) for p in manifest.parts}
    sizes["answer"] = sum(nbytes(t) for t in manifest.outputs)
    return sizes


async def run(args, say) -> dict:
    base = get_settings()
    settings = base.model_copy(update={"namespace": f"{base.namespace}.bench{uuid.uuid4().hex[:6]}"})
    parts_list = sorted({int(p) for p in args.parts.split(",")} | ({1, 5} if not args.skip_colocated else set()))
    report: dict = {"model": args.model, "jobs": args.jobs, "concurrency": args.concurrency,
                    "servers": args.servers, "distributed": {}, "colocated": {}}
    with tempfile.TemporaryDirectory(prefix="splitinfer-bench-") as tmp:
        say(f"splitting {args.model} into {parts_list} parts and starting {args.servers} servers")
        splitting = asyncio.create_task(asyncio.to_thread(
            lambda: {n: make_split(args.model, n, Path(tmp) / f"p{n}") for n in parts_list}))
        async with ClusterRun(args.servers, settings, say) as cluster:
            manifests = await splitting
            first = manifests[parts_list[0]]
            shape = [1 if d is None else d for d in first.inputs[0].shape]
            rng = np.random.default_rng(0)
            xs = [rng.uniform(0, 1, size=shape).astype(first.inputs[0].dtype) for _ in range(args.jobs)]
            say("local compiled baseline on the same inputs")
            local = await asyncio.to_thread(lambda: measure_local(local_runner(Path(tmp) / f"p{parts_list[0]}"),
                                                                  xs, first.inputs[0].name))
            loc_med = percentile(local["latency"], 50) * 1e3
            report["local"] = {"latency_median_ms": loc_med, "latency_p99_ms": percentile(local["latency"], 99) * 1e3,
                               "throughput_per_s": local["throughput"]}
            servers = [f"s{i + 1}" for i in range(args.servers)]
            async with Client(cluster.settings) as c:
                await c.wait_for_servers(args.servers, timeout=120)
                for n in parts_list:
                    if str(n) not in args.parts.split(","):
                        continue
                    placement = {f"part{i}": servers[i % len(servers)] for i in range(n)}
                    say(f"{n} part(s) on {min(n, len(servers))} server process(es)")
                    r = await run_split(c, Path(tmp) / f"p{n}", xs, placement, args.concurrency, f"d{n}")
                    report["distributed"][str(n)] = summarize(r, local, loc_med)
                if not args.skip_colocated and 5 in manifests:
                    for procs in (1, 2):
                        placement = {f"part{i}": servers[min(i * procs // 5, procs - 1)] for i in range(5)}
                        say(f"5 parts on {procs} server process(es): {placement}")
                        r = await run_split(c, Path(tmp) / "p5", xs, placement, args.concurrency, f"c5on{procs}")
                        report["colocated"][f"5_on_{procs}"] = summarize(r, local, loc_med)
                    report["colocated"]["1_on_1"] = report["distributed"].get("1") or summarize(
                        await run_split(c, Path(tmp) / "p1", xs, {"part0": servers[0]}, args.concurrency, "c1on1"),
                        local, loc_med)
            if 5 in manifests:
                say("the bare broker's hop at the same sizes")
                sizes = hop_sizes(manifests[5])
                floor = await broker_floor(cluster.settings.broker_url, sorted(set(sizes.values())))
                d5 = report["distributed"].get("5")
                rows = []
                for hop, size in sizes.items():
                    ours = next((h["transfer_ms"] for h in (d5 or {}).get("hops", []) if h["part"] == hop), None)
                    rows.append({"hop": hop, "bytes": size, "bare_ms": floor[size] * 1e3, "ours_ms": ours,
                                 "ratio": None if ours is None else ours / (floor[size] * 1e3)})
                report["broker_floor"] = rows
        if not args.skip_batching and 5 in manifests:
            # each variant on a cluster of its own: the servers read these settings at start
            for label, env in (("batching_off", {"SPLITINFER_MAX_BATCH": "1"}),
                               ("batch_delay_2ms", {"SPLITINFER_BATCH_DELAY_US": "2000"})):
                say(f"{label}: the 5-part split on a cluster whose servers run with {env}")
                variant = settings.model_copy(update={"namespace": f"{settings.namespace}.{label}"})
                os.environ.update(env)
                try:
                    async with ClusterRun(args.servers, variant, say) as cluster:
                        async with Client(cluster.settings) as c:
                            await c.wait_for_servers(args.servers, timeout=120)
                            placement = {f"part{i}": f"s{i % args.servers + 1}" for i in range(5)}
                            r = await run_split(c, Path(tmp) / "p5", xs, placement, args.concurrency, label)
                            report[label] = summarize(r, local, loc_med)
                finally:
                    for k in env:
                        os.environ.pop(k, None)
    d5, co = report["distributed"].get("5"), report["colocated"]
    ratios = [r["ratio"] for r in report.get("broker_floor", []) if r["ratio"] is not None]
    report["targets"] = {
        "latency_5_parts_at_most_1.45x_local": d5 and d5["latency_vs_local"] <= 1.45,
        "throughput_c8_at_least_1.2x_local_sequential": d5 and d5["throughput_vs_local"] >= 1.2,
        "median_hop_at_most_1.5x_bare_broker": bool(ratios) and float(np.median(ratios)) <= 1.5,
        "5_parts_on_1_process_within_1.15x_of_1_part": bool(co.get("5_on_1") and co.get("1_on_1")) and
        co["5_on_1"]["latency_median_ms"] <= 1.15 * co["1_on_1"]["latency_median_ms"],
    }
    return report


def print_report(r: dict, console: Console) -> None:
    t = Table(title=f"{r['model'].split(':')[-1]}: local compiled vs distributed ({r['jobs']} jobs, "
                    f"concurrency {r['concurrency']})")
    for col in ("run", "latency median ms", "p99 ms", "vs local", "throughput /s", "vs local seq", "batches",
                "max abs error"):
        t.add_column(col, justify="left" if col == "run" else "right")
    loc = r["local"]
    t.add_row("local compiled, 1 process", f"{loc['latency_median_ms']:.1f}", f"{loc['latency_p99_ms']:.1f}",
              "1.00x", f"{loc['throughput_per_s']:.1f} (seq)", "1.00x", "-", "-")

    def row(label: str, d: dict) -> None:
        sizes = ", ".join(f"{k}:{v}" for k, v in d["batch_sizes"].items())
        t.add_row(label, f"{d['latency_median_ms']:.1f}", f"{d['latency_p99_ms']:.1f}", f"{d['latency_vs_local']:.2f}x",
                  f"{d['throughput_per_s']:.1f}", f"{d['throughput_vs_local']:.2f}x", sizes, f"{d['max_abs_error']:.1e}")

    for n, d in r["distributed"].items():
        row(f"{n} part{'s' if n != '1' else ''} on {min(int(n), r['servers'])} processes", d)
    for key, d in r.get("colocated", {}).items():
        if key != "1_on_1":
            parts, procs = key.split("_on_")
            row(f"{parts} parts on {procs} process{'es' if procs != '1' else ''} (co-located)", d)
    if "batching_off" in r:
        row("5 parts on 5 processes, batching off", r["batching_off"])
    if "batch_delay_2ms" in r:
        row("5 parts on 5 processes, batch delay 2 ms", r["batch_delay_2ms"])
    console.print(t)
    if r.get("broker_floor"):
        f = Table(title="each hop of the 5-part run against the bare broker at the same size (one way, median)")
        for col in ("hop", "bytes", "bare broker ms", "splitinfer ms", "ratio"):
            f.add_column(col, justify="left" if col == "hop" else "right")
        for x in r["broker_floor"]:
            f.add_row(x["hop"], f"{x['bytes']:,}", f"{x['bare_ms']:.3f}",
                      "-" if x["ours_ms"] is None else f"{x['ours_ms']:.3f}",
                      "-" if x["ratio"] is None else f"{x['ratio']:.2f}x")
        console.print(f)
    for name, ok in r.get("targets", {}).items():
        console.print(f"target {name}: {'[green]met[/]' if ok else '[red]missed[/]'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="keras.applications:MobileNetV3Large")
    ap.add_argument("--parts", default="1,5", help="comma-separated part counts, one part per server process")
    ap.add_argument("--jobs", type=int, default=60)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--servers", type=int, default=5)
    ap.add_argument("--skip-colocated", action="store_true", help="no 5-parts-on-1-and-2-processes runs")
    ap.add_argument("--skip-batching", action="store_true", help="no batching-off cluster")
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
