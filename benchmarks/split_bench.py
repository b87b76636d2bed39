"""How long splitting and verifying takes: MobileNetV3Large into 5 FLOPs-balanced parts by default.

    python benchmarks/split_bench.py [--model keras.applications:NAME] [--parts 5] [--repeats 3] [--json]

Each repeat runs `splitinfer split` and `splitinfer verify` as a user would, in fresh processes, so the
times include Python/TensorFlow start-up and model construction. Medians are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return elapsed, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="keras.applications:MobileNetV3Large")
    ap.add_argument("--parts", type=int, default=5)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()

    cli = [sys.executable, "-m", "splitinfer.cli"]
    split_s, verify_s, last_report = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / f"split{i}"
            t, _ = timed([*cli, "split", args.model, "--parts", str(args.parts), "--out", str(out), "--json"])
            split_s.append(t)
            t, stdout = timed([*cli, "verify", str(out), "--samples", str(args.samples), "--json"])
            verify_s.append(t)
            last_report = json.loads(stdout)
    result = {
        "model": args.model,
        "parts": args.parts,
        "repeats": args.repeats,
        "split_s_median": statistics.median(split_s),
        "verify_s_median": statistics.median(verify_s),
        "total_s_median": statistics.median(a + b for a, b in zip(split_s, verify_s)),
        "split_s": split_s,
        "verify_s": verify_s,
        "max_abs_error": last_report.get("max_abs_error"),
        "tensors_compared": last_report.get("tensors_compared"),
    }
    if args.json:
        print(json.dumps(result))
        return
    table = Table(title=f"split + verify {args.model} into {args.parts} parts (median of {args.repeats}, fresh processes)")
    for col in ("step", "median s", "runs s"):
        table.add_column(col)
    table.add_row("split", f"{result['split_s_median']:.1f}", " ".join(f"{x:.1f}" for x in split_s))
    table.add_row("verify", f"{result['verify_s_median']:.1f}", " ".join(f"{x:.1f}" for x in verify_s))
    table.add_row("total", f"{result['total_s_median']:.1f}", "")
    Console().print(table)
    Console().print(f"max abs error {result['max_abs_error']:.3g} over {result['tensors_compared']} handed-over tensors")


if __name__ == "__main__":
    main()
