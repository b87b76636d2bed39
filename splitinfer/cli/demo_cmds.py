"""demo: the main job on a built-in default: split a model, start a local cluster, run jobs, compare."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from splitinfer.cli.app import BROKER_HELP, UserError, app, cluster_settings, console, user_errors
from splitinfer.client import Client, ClientError, JobFailed
from splitinfer.harness import (
    ClusterRun,
    HarnessError,
    hop_summary,
    local_runner,
    make_split,
    max_abs_error,
    measure_distributed,
    measure_local,
    percentile,
)


@app.command()
@user_errors
def demo(
    servers: int = typer.Option(5, "--servers", help="server processes = parts"),
    model: str = typer.Option("keras.applications:MobileNetV3Large", "--model", help="model to split (weights=None)"),
    jobs: int = typer.Option(40, "--jobs", help="jobs per measurement"),
    concurrency: int = typer.Option(8, "--concurrency", help="jobs in flight for the throughput run"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="default: a fresh demo namespace"),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
    as_json: bool = typer.Option(False, "--json", help="the report as one JSON object"),
):
    """Start a cluster of N servers, split MODEL into N parts, deploy, run jobs, compare with the local model."""
    if servers < 1:
        raise UserError("--servers must be at least 1")
    if jobs < 2 or concurrency < 1:
        raise UserError("--jobs must be at least 2 and --concurrency at least 1")
    base = cluster_settings(None, broker_url)
    ns = namespace or f"{base.namespace}.demo{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(update={"namespace": ns})
    say = (lambda m: None) if as_json else (lambda m: console.print(m, highlight=False))
    try:
        report = asyncio.run(_demo(servers, model, jobs, concurrency, settings, say))
    except HarnessError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        print(json.dumps(report))
        return
    _print_demo(report)


async def _demo(servers: int, model: str, jobs: int, concurrency: int, settings, say) -> dict:
    with tempfile.TemporaryDirectory(prefix="splitinfer-demo-") as tmp:
        split_dir = Path(tmp) / "split"
        say(f"splitting {model} into {servers} parts (in the background) and starting {servers} servers "
            f"in namespace {settings.namespace}")
        split_task = asyncio.create_task(asyncio.to_thread(make_split, model, servers, split_dir))
        try:
            async with ClusterRun(servers, settings, say) as cluster:
                manifest = await split_task
                say(f"split {manifest.split_id}: " + ", ".join(
                    f"{p.name} ({len(p.operations)} ops)" for p in manifest.parts))
                input_name = manifest.inputs[0].name
                shape = [1 if d is None else d for d in manifest.inputs[0].shape]
                rng = np.random.default_rng(0)
                xs = [rng.uniform(0, 1, size=shape).astype(manifest.inputs[0].dtype) for _ in range(jobs)]
                try:
                    async with Client(cluster.settings) as c:
                        say("deploying (servers fetch their parts from the model pool and compile them)")
                        dep = await c.deploy(split_dir, min_servers=servers, timeout=600)
                        say(f"deployed {dep.deployment} in {dep.load_s:.1f}s: " + ", ".join(
                            f"{p}->{s[0]}" for p, s in dep.placement.items()))
                        await measure_distributed(c, dep.deployment, xs[:3], input_name, 1)  # warm-up
                        say(f"{jobs} jobs one at a time, then {jobs} with {concurrency} in flight")
                        seq = await measure_distributed(c, dep.deployment, xs, input_name, 1)
                        par = await measure_distributed(c, dep.deployment, xs, input_name, concurrency)
                except (ClientError, JobFailed) as exc:
                    raise UserError(str(exc)) from None
                say("the same inputs on the local compiled model")
                local = await asyncio.to_thread(
                    lambda: measure_local(local_runner(split_dir), xs, input_name))
        finally:
            if not split_task.done():
                split_task.cancel()
            with contextlib.suppress(BaseException):
                await split_task
    err = max(max_abs_error(seq["results"], local["outputs"]), max_abs_error(par["results"], local["outputs"]))
    return {
        "model": model, "parts": servers, "servers": servers, "jobs": jobs, "concurrency": concurrency,
        "namespace": settings.namespace, "deployment": dep.deployment, "placement": dep.placement,
        "local": {"latency_median_ms": percentile(local["latency"], 50) * 1e3,
                  "latency_p99_ms": percentile(local["latency"], 99) * 1e3,
                  "throughput_per_s": local["throughput"]},
        "distributed": {"latency_median_ms": percentile(seq["latency"], 50) * 1e3,
                        "latency_p99_ms": percentile(seq["latency"], 99) * 1e3,
                        "throughput_per_s": par["throughput"],
                        "throughput_c1_per_s": seq["throughput"]},
        "max_abs_error": err,
        "hops": hop_summary(seq["results"]),
    }


def _print_demo(r: dict) -> None:
    table = Table(title=f"{r['model'].split(':')[-1]}: local vs {r['parts']} parts on {r['servers']} server processes "
                        f"({r['jobs']} jobs)")
    for col in ("run", "latency median ms", "latency p99 ms", f"throughput /s (c={r['concurrency']})",
                "max abs error"):
        table.add_column(col, justify="left" if col == "run" else "right")
    loc, dist = r["local"], r["distributed"]
    table.add_row("local compiled (1 process)", f"{loc['latency_median_ms']:.1f}", f"{loc['latency_p99_ms']:.1f}",
                  f"{loc['throughput_per_s']:.1f} (sequential)", "-")
    table.add_row(f"distributed ({r['parts']} parts)", f"{dist['latency_median_ms']:.1f}",
                  f"{dist['latency_p99_ms']:.1f}", f"{dist['throughput_per_s']:.1f}", f"{r['max_abs_error']:.2e}")
    console.print(table)
    hops = Table(title="where the time went (mean per job, concurrency 1)")
    for col in ("hop", "server", "transfer ms", "queue ms", "compute ms"):
        hops.add_column(col, justify="left" if col in ("hop", "server") else "right")
    for h in r["hops"]:
        hops.add_row(h["part"], h["server"], f"{h['transfer_ms']:.2f}", f"{h['queue_ms']:.2f}",
                     f"{h['compute_ms']:.2f}")
    console.print(hops)
