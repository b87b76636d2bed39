"""How long profiling takes and how well the profile predicts: MobileNetV3Large 224x224x3 batch 1 by default.

    python benchmarks/profile_bench.py [--model keras.applications:NAME] [--repeats 2] [--parts 5] [--json]

End to end: `splitinfer profile MODEL --json --refresh` in a fresh process, as a user runs it (Python and
TensorFlow start-up, model construction, FLOPs, compiling and timing the segments), then the same command
again answered from the cache. In this process: the phases of one profile, the whole model against the sum
of its segments, and predicted against measured latency of FLOPs-balanced parts. Medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from rich.console import Console
from rich.table import Table


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    return elapsed, proc.stdout


def in_process(model_spec: str, parts: int, cache_dir: str) -> dict:
    from splitinfer import _tf  # noqa: F401
    from splitinfer.monitor.machine import apply_threads
    from splitinfer.config import get_settings

    settings = get_settings()
    apply_threads(settings.intra_op_threads, settings.inter_op_threads)
    from splitinfer.monitor import (
        build_profile,
        calibrate,
        measure_parts,
        node_flops,
        predict_part_latency,
        whole_model_profiler_flops,
    )
    from splitinfer.splitter import ModelGraph, load_source_model, split_at_cuts
    from splitinfer.splitter.partition import balanced_cuts

    t0 = time.perf_counter()
    graph = ModelGraph(load_source_model(model_spec))
    t1 = time.perf_counter()
    flops = node_flops(graph)
    t2 = time.perf_counter()
    profiler_total = whole_model_profiler_flops(graph)
    profile = build_profile(graph)
    t3 = time.perf_counter()
    cal = calibrate()
    t4 = time.perf_counter()
    specs = split_at_cuts(graph, balanced_cuts(graph, flops, parts))
    # the profile's segments are timed again in the same rounds as the parts: their ratio to the profile is the
    # load factor of this shared machine now, applied as a calibration scaled by it (see tests/unit/test_profile.py)
    segments = split_at_cuts(graph, [s.ends_at for s in profile.segments if s.ends_at])
    times = measure_parts(graph, segments + specs)
    measured = times[len(segments):]
    k = sum(times[: len(segments)]) / sum(s.measured_ms for s in profile.segments)
    now = cal.model_copy(update={"conv_gflops": cal.conv_gflops / k, "dense_gflops": cal.dense_gflops / k,
                                 "memory_gbps": cal.memory_gbps / k, "call_overhead_ms": cal.call_overhead_ms * k})
    predicted = [predict_part_latency(profile, s.nodes, cal, cal) for s in specs]
    corrected = [predict_part_latency(profile, s.nodes, cal, now) for s in specs]
    tot = profile.totals
    return {
        "load_s": t1 - t0,
        "node_flops_s": t2 - t1,
        "build_profile_s": t3 - t2,
        "calibrate_s": t4 - t3,
        "flops": tot.flops,
        "profiler_flops": profiler_total,
        "whole_ms": tot.latency_ms,
        "segments": tot.segments,
        "segments_compute_plus_one_call_ms": tot.segments_as_one_call_ms,
        "segments_raw_sum_ms": tot.sum_segment_latency_ms,
        "call_overhead_ms": tot.call_overhead_ms,
        "fit": profile.fit.model_dump(),
        "calibration": {k: getattr(cal, k) for k in ("conv_gflops", "dense_gflops", "memory_gbps", "call_overhead_ms")},
        "load_factor": k,
        "parts": [
            {"part": s.name, "ops": len(s.nodes), "predicted_ms": p, "measured_ms": m, "error": (m - p) / p,
             "predicted_load_corrected_ms": c, "error_load_corrected": (m - c) / c}
            for s, p, c, m in zip(specs, predicted, corrected, measured)
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="keras.applications:MobileNetV3Large")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--parts", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = ap.parse_args()

    cli = [sys.executable, "-m", "splitinfer.cli", "profile", args.model, "--json"]
    cold, warm = [], []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SPLITINFER_CACHE_DIR": tmp}
        for _ in range(args.repeats):
            t, _ = timed([*cli, "--refresh"], env)
            cold.append(t)
            t, _ = timed(cli, env)
            warm.append(t)
        detail = in_process(args.model, args.parts, tmp)
    result = {
        "model": args.model,
        "repeats": args.repeats,
        "cli_profile_cold_s_median": statistics.median(cold),
        "cli_profile_cached_s_median": statistics.median(warm),
        "cli_profile_cold_s": cold,
        "cli_profile_cached_s": warm,
        **detail,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    console = Console()
    table = Table(title=f"profiling {args.model} (medians of {args.repeats})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    d = detail
    rows = [
        ("`splitinfer profile` end to end, fresh process", f"{result['cli_profile_cold_s_median']:.1f} s"),
        ("same command answered from the cache", f"{result['cli_profile_cached_s_median']:.1f} s"),
        ("  model construction (in process)", f"{d['load_s']:.1f} s"),
        ("  FLOPs per operation (TF profiler)", f"{d['node_flops_s']:.1f} s"),
        ("  build_profile (compile + time segments)", f"{d['build_profile_s']:.1f} s"),
        ("calibrate", f"{d['calibrate_s']:.1f} s"),
        ("FLOPs: per-op sum / TF profiler", f"{d['flops'] / 1e9:.4f} / {d['profiler_flops'] / 1e9:.4f} G"),
        ("whole model, compiled", f"{d['whole_ms']:.2f} ms"),
        (f"{d['segments']} segments: compute + one call", f"{d['segments_compute_plus_one_call_ms']:.2f} ms"),
        (f"{d['segments']} segments: raw sum of calls", f"{d['segments_raw_sum_ms']:.2f} ms"),
        ("empty compiled call", f"{d['call_overhead_ms']:.3f} ms"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    parts = Table(title=f"{len(d['parts'])} FLOPs-balanced parts: predicted vs measured "
                        f"(load factor now {d['load_factor']:.2f})")
    for col in ("part", "ops", "predicted ms", "measured ms", "error", "load-corrected ms", "error "):
        parts.add_column(col, justify="right")
    for p in d["parts"]:
        parts.add_row(p["part"], str(p["ops"]), f"{p['predicted_ms']:.2f}", f"{p['measured_ms']:.2f}",
                      f"{p['error']:+.0%}", f"{p['predicted_load_corrected_ms']:.2f}", f"{p['error_load_corrected']:+.0%}")
    console.print(parts)


if __name__ == "__main__":
    main()
