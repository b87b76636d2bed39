"""Runtimes compared: each part of a split, and the whole model, on tf.function, ONNX Runtime and LiteRT (where
installed), at batch 1 and 8; then the split served end to end on every part's fastest runtime against tf only.

    python benchmarks/backends.py [--model keras.applications:NAME] [--parts 5] [--rounds 30] [--jobs 40]
                                  [--concurrency 8] [--skip-e2e] [--json]

Every figure is a median, the runtimes alternating call by call in one process with the servers' thread settings
(SPLITINFER_INTRA_OP_THREADS, 1 by default), so a noisy neighbour slows them alike. The end-to-end part deploys the
`--parts` split on as many server processes twice (every part on tf; every part on its fastest runtime as measured
here) and reports latency (jobs one at a time) and throughput (`--concurrency` in flight) against the whole model
on tf and on ONNX Runtime in this process. Not run in CI (a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from splitinfer.client import Client
from splitinfer.config import get_settings
from splitinfer.harness import ClusterRun, make_split, measure_local, percentile, run_split, summarize
from splitinfer.splitter.manifest import Manifest


def _runtime_table(split: Path, runtimes: list[str], batches: list[int], rounds: int, threads: int,
                   progress: Progress) -> dict:
    from splitinfer.monitor.backends import measure_runtimes

    manifest = Manifest.load(split)
    out: dict = {}
    for batch in batches:
        task = progress.add_task(f"{split.name}: each part on each runtime, batch {batch}", total=len(manifest.parts))
        out[str(batch)] = measure_runtimes(split, manifest, runtimes, batch=batch, rounds=rounds, threads=threads,
                                           progress=lambda _: progress.advance(task))
    return out


async def _e2e(args, tmp: Path, fastest: dict[str, str], say) -> dict:
    from splitinfer.harness import local_runner
    from splitinfer.splitter.runtimes import load_parts

    base = get_settings()
    settings = base.model_copy(update={"namespace": f"{base.namespace}.backends{uuid.uuid4().hex[:6]}"})
    split = tmp / f"p{args.parts}"
    manifest = Manifest.load(split)
    shape = [1 if d is None else d for d in manifest.inputs[0].shape]
    rng = np.random.default_rng(0)
    xs = [rng.uniform(0, 1, size=shape).astype(manifest.inputs[0].dtype) for _ in range(args.jobs)]
    name = manifest.inputs[0].name
    say("the whole model in this process: tf.function and ONNX Runtime")
    local = measure_local(local_runner(tmp / "p1"), xs, name)
    whole_ort = load_parts(tmp / "p1", Manifest.load(tmp / "p1"), "onnxruntime", args.threads)[0]
    local_ort = measure_local(whole_ort, xs, name)
    loc_med = percentile(local["latency"], 50) * 1e3
    report = {"local_tf": {"latency_median_ms": loc_med, "throughput_per_s": local["throughput"]},
              "local_onnxruntime": {"latency_median_ms": percentile(local_ort["latency"], 50) * 1e3,
                                    "throughput_per_s": local_ort["throughput"]}}
    variants = {"tf": {p.name: "tf" for p in manifest.parts}, "fastest": fastest}
    async with ClusterRun(args.parts, settings, say) as cluster:
        async with Client(cluster.settings) as c:
            await c.wait_for_servers(args.parts, timeout=120)
            for label, chosen in variants.items():
                variant_dir = tmp / f"e2e_{label}"
                shutil.copytree(split, variant_dir)
                m = Manifest.load(variant_dir)
                for entry in m.parts:
                    entry.runtime = chosen[entry.name]
                m.save(variant_dir)
                say(f"{args.parts} parts on {args.parts} server processes, runtimes: {chosen}")
                placement = {p.name: f"s{i + 1}" for i, p in enumerate(m.parts)}
                r = await run_split(c, variant_dir, xs, placement, args.concurrency, f"rt-{label}")
                report[label] = summarize(r, local, loc_med)
                report[label]["runtimes"] = chosen
    return report


def run(args, say) -> dict:
    from splitinfer.actors.model_server.runner import configure_tf
    from splitinfer.splitter.runtimes import available_runtimes

    settings = get_settings().model_copy(update={"intra_op_threads": args.threads})
    configure_tf(settings)  # as the servers run: before TensorFlow starts its thread pools
    runtimes = available_runtimes()
    exports = tuple(fmt for r, fmt in (("onnxruntime", "onnx"), ("litert", "tflite")) if r in runtimes)
    report: dict = {"model": args.model, "parts": args.parts, "threads": args.threads, "runtimes": runtimes,
                    "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="splitinfer-backends-") as tmp_name:
        tmp = Path(tmp_name)
        say(f"splitting {args.model} into {args.parts} parts and as one part, exported to {', '.join(exports)}")
        make_split(args.model, args.parts, tmp / f"p{args.parts}", exports=exports)
        make_split(args.model, 1, tmp / "p1", exports=exports)
        with Progress(transient=True, disable=args.json) as progress:
            report["per_part"] = _runtime_table(tmp / f"p{args.parts}", runtimes, [1, 8], args.rounds, args.threads,
                                                progress)
            report["whole"] = {b: t["part0"] for b, t in _runtime_table(tmp / "p1", runtimes, [1, 8], args.rounds,
                                                                       args.threads, progress).items()}
        fastest = {p: min(t, key=t.get) for p, t in report["per_part"]["1"].items()}
        report["fastest"] = fastest
        if not args.skip_e2e:
            report["e2e"] = asyncio.run(_e2e(args, tmp, fastest, say))
    return report


def print_report(r: dict, console: Console) -> None:
    for batch in ("1", "8"):
        t = Table(title=f"{r['model'].split(':')[-1]}: median ms per call at batch {batch} "
                        f"({r['threads']} intra-op thread{'s' if r['threads'] != 1 else ''})")
        t.add_column("part")
        for rt in r["runtimes"]:
            t.add_column(rt, justify="right")
        t.add_column("fastest", justify="left")
        rows = {**r["per_part"][batch], "whole model": r["whole"][batch]}
        for part, times in rows.items():
            best = min(times, key=times.get)
            t.add_row(part, *[f"{times[rt]:.2f}" if rt in times else "-" for rt in r["runtimes"]],
                      f"{best} ({times.get('tf', float('nan')) / times[best]:.1f}x tf)")
        console.print(t)
    e2e = r.get("e2e")
    if e2e:
        t = Table(title=f"{r['parts']} parts on {r['parts']} server processes, end to end")
        for col in ("run", "latency median ms", "vs local tf", "throughput /s (c=8)", "vs local tf seq",
                    "max abs error"):
            t.add_column(col, justify="left" if col == "run" else "right")
        loc = e2e["local_tf"]
        t.add_row("whole model, tf.function, 1 process", f"{loc['latency_median_ms']:.1f}", "1.00x",
                  f"{loc['throughput_per_s']:.1f} (seq)", "1.00x", "-")
        ort = e2e["local_onnxruntime"]
        t.add_row("whole model, ONNX Runtime, 1 process", f"{ort['latency_median_ms']:.1f}",
                  f"{ort['latency_median_ms'] / loc['latency_median_ms']:.2f}x", f"{ort['throughput_per_s']:.1f} (seq)",
                  f"{ort['throughput_per_s'] / loc['throughput_per_s']:.2f}x", "-")
        for label in ("tf", "fastest"):
            d = e2e[label]
            t.add_row(f"split, every part on {'tf' if label == 'tf' else 'its fastest runtime'}",
                      f"{d['latency_median_ms']:.1f}", f"{d['latency_vs_local']:.2f}x", f"{d['throughput_per_s']:.1f}",
                      f"{d['throughput_vs_local']:.2f}x", f"{d['max_abs_error']:.1e}")
        console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="keras.applications:MobileNetV3Large")
    ap.add_argument("--parts", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=get_settings().intra_op_threads)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    console = Console(stderr=args.json)
    report = run(args, lambda m: console.print(f"[dim]{m}[/]"))
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print_report(report, console)


if __name__ == "__main__":
    main()
