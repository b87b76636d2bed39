"""split, verify, cuts: the splitter's commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from splitinfer.cli.app import MODEL_HELP, SHAPE_HELP, UserError, app, console, progress_bar, user_errors
from splitinfer.config import get_settings
from splitinfer.monitor.plot import plot_cut_points
from splitinfer.splitter.partition import balanced_split, cut_point_rows, split_at_cuts, split_by_groups



def _load_graph(model: str, input_shape: Optional[str], seed: int = 0):
    from splitinfer.splitter import load_graph, parse_shape  # lazy: loads TensorFlow

    with console.status(f"loading {model}"):
        return load_graph(model, parse_shape(input_shape), seed=seed)


def _parse_cuts(text: str) -> list[list[str]]:
    """`a:0,b:0+c:0`: cut after a:0, then after the frontier {b:0, c:0}."""
    cuts = [[t.strip() for t in group.split("+") if t.strip()] for group in text.split(",") if group.strip()]
    if not cuts:
        raise UserError("--cuts is empty")
    return cuts


def _parse_partition(path: Path) -> dict[str, str]:
    """A JSON object {operation: group} or a list of lists of operations."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read partition {path}: {exc}") from None
    if isinstance(data, dict):
        return {str(k): str(v) for k, v in data.items()}
    if isinstance(data, list) and all(isinstance(g, list) for g in data):
        return {str(op): str(i) for i, group in enumerate(data) for op in group}
    raise UserError(f"partition {path} must be {{operation: group}} or [[operations], ...]")


@app.command()
@user_errors
def split(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="directory for the parts and manifest.json"),
    parts: Optional[int] = typer.Option(None, "--parts", help="number of parts, balanced by FLOPs (within 5%, then "
                                                               "the fewest bytes at the cuts; cuts of several "
                                                               "tensors where single ones are too few)"),
    cuts: Optional[str] = typer.Option(
        None, "--cuts", help="cut tensors, comma separated; join tensors that must be cut together with +"
    ),
    partition: Optional[Path] = typer.Option(None, "--partition", help="JSON {operation: group}: any acyclic partition"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=SHAPE_HELP),
    seed: int = typer.Option(0, help="seed for the random weights of keras.applications models"),
    runtimes: Optional[str] = typer.Option(
        None, "--runtimes", help="runtimes to give each part a file for, comma separated: tf, onnxruntime, litert "
                                 "(default: the model's own: tf for Keras, onnxruntime for ONNX)"),
    runtime: str = typer.Option("auto", "--runtime", help="the runtime servers run each part on: auto (the fastest "
                                                          "measured here, per part) or one of --runtimes"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest summary as JSON"),
):
    """Split MODEL into parts that compose back exactly, and write them with a manifest."""
    from splitinfer.splitter import save_split  # lazy: loads TensorFlow
    from splitinfer.splitter.manifest import RUNTIME_FORMATS

    chosen = [x is not None for x in (parts, cuts, partition)]
    if sum(chosen) != 1:
        raise UserError("give exactly one of --parts, --cuts or --partition")
    if parts is not None and parts < 1:
        raise UserError("--parts must be at least 1")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    cut_list = _parse_cuts(cuts) if cuts is not None else None
    groups = _parse_partition(partition) if partition is not None else None
    wanted = [r.strip() for r in (runtimes or "").split(",") if r.strip()]
    unknown = [r for r in [*wanted, runtime] if r not in RUNTIME_FORMATS and r != "auto"]
    if unknown:
        raise UserError(f"unknown runtime {unknown[0]!r}: use {', '.join(RUNTIME_FORMATS)}")
    if runtime != "auto" and wanted and runtime not in wanted:
        raise UserError(f"--runtime {runtime} is not one of --runtimes {runtimes}")
    graph = _load_graph(model, input_shape, seed)
    own = "onnxruntime" if model.endswith(".onnx") else "tf"
    if model.endswith(".onnx") and any(r != own for r in [*wanted, runtime] if r != "auto"):
        raise UserError("an ONNX model's parts run on onnxruntime only")
    wanted = list(dict.fromkeys([own, *wanted, *([runtime] if runtime != "auto" else [])]))
    exports = [RUNTIME_FORMATS[r] for r in wanted if r != own]
    if parts is not None:
        from splitinfer.monitor import node_flops  # lazy: loads TensorFlow

        with console.status("counting FLOPs per operation"):
            costs = node_flops(graph)
        specs = balanced_split(graph, costs, parts)
    elif cut_list is not None:
        specs = split_at_cuts(graph, cut_list)
    else:
        specs = split_by_groups(graph, groups)
    with progress_bar(as_json) as progress:
        task = progress.add_task("saving parts", total=len(specs))
        try:
            manifest = save_split(graph, specs, out, origin=model, progress=lambda _: progress.advance(task),
                                  exports=exports)
        except OSError as exc:
            raise UserError(f"cannot write the split to {out}: {exc.strerror or exc}") from None
        if len(wanted) > 1:
            from splitinfer.monitor.backends import choose_runtimes, measure_runtimes

            task = progress.add_task("timing each part on each runtime", total=len(specs))
            measured = measure_runtimes(out, manifest, wanted, threads=get_settings().intra_op_threads,
                                        progress=lambda _: progress.advance(task))
            choose_runtimes(manifest, measured, None if runtime == "auto" else runtime).save(out)
    if as_json:
        print(json.dumps({"split_id": manifest.split_id, "out": str(out), "parts": _part_rows(manifest)}))
        return
    table = Table(title=f"{manifest.source.name} in {len(manifest.parts)} parts -> {out}")
    for col in ("part", "ops", "inputs", "outputs", "out bytes", "runtime"):
        table.add_column(col, justify="right" if col in ("ops", "out bytes") else "left")
    for row in _part_rows(manifest):
        times = ", ".join(f"{r} {ms:.2f} ms" for r, ms in row["runtime_ms"].items())
        table.add_row(row["name"], str(row["operations"]), ", ".join(row["inputs"]), ", ".join(row["outputs"]),
                      f"{row['output_bytes']:,}", row["runtime"] + (f" ({times})" if times else ""))
    console.print(table)


def _part_rows(manifest) -> list[dict]:
    def nbytes(t) -> int:
        return int(np.prod([d or 1 for d in t.shape])) * np.dtype(t.dtype).itemsize

    return [
        {
            "name": p.name,
            "operations": len(p.operations),
            "inputs": [t.name for t in p.inputs],
            "outputs": [t.name for t in p.outputs],
            "output_bytes": sum(nbytes(t) for t in p.outputs),
            "format": p.format,
            "runtime": p.runtime_name,
            "runtime_ms": p.runtime_ms,
        }
        for p in manifest.parts
    ]


@app.command()
@user_errors
def verify(
    directory: Path = typer.Argument(..., help="a split directory with manifest.json"),
    samples: int = typer.Option(2, "--samples", help="random inputs to compare on"),
    seed: int = typer.Option(0, "--seed", help="seed of the random inputs"),
    tolerance: Optional[float] = typer.Option(None, "--tolerance",
                                              help="max abs error allowed (default SPLITINFER_VERIFY_TOLERANCE, 1e-4)"),
    as_json: bool = typer.Option(False, "--json", help="the report as JSON"),
):
    """Run the saved parts composed as the manifest says and compare with the full model."""
    from splitinfer.splitter import verify_split  # lazy: loads TensorFlow

    if samples < 1:
        raise UserError("--samples must be at least 1")
    tol = get_settings().verify_tolerance if tolerance is None else tolerance
    with console.status(f"verifying {directory}"):
        report = verify_split(directory, samples=samples, seed=seed)
    report["tolerance"] = tol
    report["ok"] = report["max_abs_error"] <= tol
    if as_json:
        print(json.dumps(report))
    else:
        mark = "[green]ok[/]" if report["ok"] else "[red]MISMATCH[/]"
        console.print(
            f"{mark} {report['model']} in {report['parts']} parts, {samples} samples: "
            f"{report['tensors_compared']} handed-over tensors compared, "
            f"max abs error {report['max_abs_error']:.3g} (tolerance {tol:g})"
        )
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
@user_errors
def cuts(
    model: str = typer.Argument(..., help=MODEL_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=SHAPE_HELP),
    batch: int = typer.Option(1, "--batch", "-b", help="batch size the live bytes are given for"),
    as_json: bool = typer.Option(False, "--json", help="the cut points as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="draw the cut points along the model (PNG)"),
):
    """List the valid single-tensor cut points with the bytes live at each."""
    if batch < 1:
        raise UserError("--batch must be at least 1")
    graph = _load_graph(model, input_shape)
    rows = cut_point_rows(graph, batch)
    if plot is not None:
        try:
            plot_cut_points(graph, rows, plot)
        except OSError as exc:
            raise UserError(f"cannot write the plot to {plot}: {exc.strerror or exc}") from None
    if as_json:
        print(json.dumps({"model": graph.name, "operations": len(graph.compute_nodes), "cut_points": rows}))
        return
    table = Table(title=f"{graph.name}: {len(rows)} cut points over {len(graph.compute_nodes)} operations")
    for col in ("#", "tensor", "after op #", "shape", "bytes"):
        table.add_column(col, justify="left" if col in ("tensor", "shape") else "right")
    for i, r in enumerate(rows):
        table.add_row(str(i), r["tensor"], str(r["position"]), "x".join(str(d) for d in r["shape"][1:]), f"{r['bytes']:,}")
    console.print(table)
    if plot is not None:
        console.print(f"plot written to {plot}")
