"""profile, calibrate: measuring models and machines for the cost model."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from splitinfer.cli.app import MODEL_HELP, SHAPE_HELP, UserError, app, console, progress_bar, user_errors
from splitinfer.config import get_settings
from splitinfer.monitor.cache import calibration_path
from splitinfer.monitor.calibration import calibrate as measure
from splitinfer.monitor.machine import apply_threads
from splitinfer.monitor.plot import plot_profile
from splitinfer.monitor.profile import profile_model

THREADS_HELP = "TF intra-op threads to measure with (default settings.intra_op_threads, as servers run)"


def measure_threads(threads: Optional[int]) -> None:
    """Measure with the thread pools servers use. If TF's runtime already started in this process (only when the
    CLI is called in-process, e.g. from tests) its pools stay as they are; the profile records what was used."""
    from splitinfer import _tf  # noqa: F401  (lazy: TensorFlow, whose thread pools are set here)

    settings = get_settings()
    intra = settings.intra_op_threads if threads is None else threads
    if intra < 0:
        raise UserError("--threads must be 0 (all cores) or more")
    try:
        apply_threads(intra, settings.inter_op_threads)
    except RuntimeError:
        pass


@app.command()
@user_errors
def profile(
    model: str = typer.Argument(..., help=MODEL_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=SHAPE_HELP),
    batch: int = typer.Option(1, "--batch", "-b", help="batch size to profile at"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the profile JSON here"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write the latency / output-size figure (PNG) here"),
    as_json: bool = typer.Option(False, "--json", help="print the whole profile as JSON on stdout"),
    segments: int = typer.Option(12, help="compiled segments to time (groups of consecutive cut points)"),
    rounds: int = typer.Option(40, help="timed rounds (median) after warm-up"),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    refresh: bool = typer.Option(False, "--refresh", help="measure again even if a cached profile exists"),
    seed: int = typer.Option(0, help="seed for the random weights of keras.applications models"),
):
    """Profile MODEL: FLOPs, params, bytes and measured latency per operation, and every valid cut point."""
    if batch < 1:
        raise UserError("--batch must be at least 1")
    if segments < 1:
        raise UserError("--segments must be at least 1")
    if rounds < 3:
        raise UserError("--rounds must be at least 3")
    measure_threads(threads)
    from splitinfer.splitter import ModelGraph, load_source_model, parse_shape  # lazy: loads TensorFlow

    with console.status(f"loading {model}") if not as_json else nullcontext():
        graph = ModelGraph(load_source_model(model, parse_shape(input_shape), seed=seed))
    with progress_bar(as_json) as progress:
        task = progress.add_task("profiling", total=None)

        def report(what: str, done: int, total: int) -> None:
            progress.update(task, description=what, completed=done, total=total)

        result = profile_model(graph, batch=batch, segments=segments, rounds=rounds, refresh=refresh,
                               progress=report)
    if out is not None:
        try:
            result.save(out)
        except OSError as exc:
            raise UserError(f"cannot write the profile to {out}: {exc.strerror or exc}") from None
    if plot is not None:
        try:
            plot_profile(result, plot)
        except OSError as exc:
            raise UserError(f"cannot write the plot to {plot}: {exc.strerror or exc}") from None
    if as_json:
        print(result.model_dump_json())
        return
    _print_profile(result, out, plot)


def _print_profile(p, out: Optional[Path], plot: Optional[Path]) -> None:
    t = p.totals
    shape = " + ".join("x".join(str(d) for d in s) for s in p.input_shapes)
    table = Table(title=f"{p.model} {shape} batch {p.batch} on {p.machine.cpu} ({p.machine.intra_op_threads} thread(s))")
    table.add_column("total")
    table.add_column("value", justify="right")
    rows = [
        ("FLOPs (sum per operation)", f"{t.flops / 1e9:,.3f} G"),
        ("FLOPs (TF profiler, whole model)", f"{t.profiler_flops / 1e9:,.3f} G"),
        ("parameters", f"{t.params:,}"),
        (f"whole model, compiled (median, {p.clock} clock)", f"{t.latency_ms:,.2f} ms  (IQR {t.latency_iqr_ms:.2f})"),
        ("whole model, wall clock (median)", f"{t.latency_wall_ms:,.2f} ms"),
        ("sum of per-operation latencies", f"{t.sum_op_latency_ms:,.2f} ms"),
        (f"{t.segments} segments' compute + one call overhead", f"{t.segments_as_one_call_ms:,.2f} ms"),
        (f"{t.segments} segments as separate calls", f"{t.sum_segment_latency_ms:,.2f} ms"),
        ("call overhead (empty compiled call)", f"{t.call_overhead_ms:.3f} ms"),
        ("operations / valid cut points", f"{sum(1 for o in p.ops if not o.is_input)} / {len(p.cut_points)}"),
        ("profiling took", f"{p.profile_seconds:.1f} s"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    top = sorted((o for o in p.ops if not o.is_input), key=lambda o: -o.latency_ms)[:8]
    ops = Table(title="slowest operations")
    for col in ("operation", "type", "MFLOPs", "out KiB", "ms"):
        ops.add_column(col, justify="left" if col in ("operation", "type") else "right")
    for o in top:
        ops.add_row(o.name, o.op_type, f"{o.flops / 1e6:,.1f}", f"{o.output_bytes / 1024:,.1f}", f"{o.latency_ms:.3f}")
    console.print(ops)
    if out is not None:
        console.print(f"profile written to {out}")
    if plot is not None:
        console.print(f"plot written to {plot}")


@app.command()
@user_errors
def calibrate(
    as_json: bool = typer.Option(False, "--json", help="print the calibration as JSON on stdout"),
    rounds: int = typer.Option(30, help="timed rounds (median) after warm-up"),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the calibration JSON here"),
):
    """Measure this machine: sustained conv and dense GFLOP/s, memory bandwidth, compiled-call overhead."""
    if rounds < 3:
        raise UserError("--rounds must be at least 3")
    measure_threads(threads)

    with progress_bar(as_json) as progress:
        task = progress.add_task("calibrating", total=rounds)
        cal = measure(rounds=rounds, progress=lambda what, done, total: progress.update(task, completed=done))
    cached = cal.save(calibration_path(cal.machine.fingerprint))
    if out is not None:
        try:
            cal.save(out)
        except OSError as exc:
            raise UserError(f"cannot write the calibration to {out}: {exc.strerror or exc}") from None
    if as_json:
        print(cal.model_dump_json())
        return
    table = Table(title=f"{cal.machine.cpu}, {cal.machine.intra_op_threads} thread(s), fingerprint {cal.machine.fingerprint}")
    table.add_column("workload")
    table.add_column("rate", justify="right")
    table.add_row("3x3 convolution 56x56x64->64", f"{cal.conv_gflops:,.1f} GFLOP/s")
    table.add_row("matrix product 128x1024x1024", f"{cal.dense_gflops:,.1f} GFLOP/s")
    table.add_row("element-wise pass over 32 MB", f"{cal.memory_gbps:,.1f} GB/s")
    table.add_row("empty compiled call", f"{cal.call_overhead_ms:.3f} ms")
    console.print(table)
    console.print(f"saved to {cached}" + (f" and {out}" if out else ""))
