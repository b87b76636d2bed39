"""infer, results: run one job and see where its time went, and read stored results and errors."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from splitinfer.actors.result_store.store import ResultStore, StoreURLError
from splitinfer.cli.app import (
    BROKER_HELP,
    NS_HELP,
    UserError,
    app,
    client_errors,
    cluster_settings,
    console,
    duration_option,
    user_errors,
)
from splitinfer.client import Client


def _load_inputs(specs: list[str]) -> dict[str, "object"] | "object":
    """`x.npy` (the model's only input) or `NAME=x.npy` per input; .npy only, never pickled objects."""
    def load(path: str):
        p = Path(path)
        if not p.exists():
            raise UserError(f"input file not found: {path}")
        try:
            return np.load(p, allow_pickle=False)
        except Exception as exc:
            raise UserError(f"cannot read {path} as .npy: {str(exc).splitlines()[0] if str(exc) else exc}") from None

    named = [s for s in specs if "=" in s and not Path(s).exists()]
    if not named:
        if len(specs) != 1:
            raise UserError("give one --input x.npy, or NAME=x.npy for each input")
        return load(specs[0])
    if len(named) != len(specs):
        raise UserError("mix of NAME=x.npy and bare x.npy inputs; name every input")
    return {name: load(path) for name, path in (s.split("=", 1) for s in specs)}


@app.command()
@user_errors
def infer(
    deployment: str = typer.Option(..., "--deployment", "-d", help="deployment id (see `splitinfer status`)"),
    inputs: list[str] = typer.Option(..., "--input", "-i", help="x.npy, or NAME=x.npy per input (repeat)"),
    deadline: Optional[float] = typer.Option(None, "--deadline", help="seconds (default SPLITINFER_JOB_DEADLINE_S)"),
    max_latency: Optional[str] = typer.Option(None, "--max-latency", help="model deployment: latency budget for the "
                                                                          "plan choice (50ms, 0.05s)"),
    battery: Optional[float] = typer.Option(None, "--battery", help="model deployment: the device's battery level "
                                                                    "0..1 (default: as the device reports it)"),
    min_fidelity: Optional[float] = typer.Option(None, "--min-fidelity", help="model deployment: lowest fidelity "
                                                                              "(compressed cuts) acceptable"),
    min_accuracy: Optional[float] = typer.Option(None, "--min-accuracy", help="model deployment with variants: "
                                                                              "lowest accuracy acceptable"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="save the outputs to this .npz"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
    as_json: bool = typer.Option(False, "--json", help="outputs (values included), hops and latency as JSON"),
):
    """Run one inference job through the front end and print where the time went."""
    if deadline is not None and deadline <= 0:
        raise UserError("--deadline must be positive")
    if battery is not None and not 0.0 <= battery <= 1.0:
        raise UserError("--battery must be between 0 and 1")
    if min_fidelity is not None and not 0.0 < min_fidelity <= 1.0:
        raise UserError("--min-fidelity must be in (0, 1]")
    if min_accuracy is not None and not 0.0 < min_accuracy <= 1.0:
        raise UserError("--min-accuracy must be in (0, 1]")
    budget = duration_option(max_latency, "--max-latency")
    x = _load_inputs(inputs)
    settings = cluster_settings(namespace, broker_url)

    async def run():
        async with Client(settings) as c:
            t0 = time.perf_counter()
            result = await c.infer(deployment, x, deadline_s=deadline, max_latency_s=budget, battery=battery,
                                   min_fidelity=min_fidelity, min_accuracy=min_accuracy)
            return result, time.perf_counter() - t0

    result, wall = client_errors(run())
    if out is not None:
        np.savez(out, **{k.replace("/", "_").replace(":", "_"): v for k, v in result.outputs.items()})
    if as_json:
        print(json.dumps({
            "job_id": result.job_id, "deployment": result.deployment, "latency_s": result.latency_s,
            "client_wall_s": wall, "served_by": result.served_by, "plan": result.plan,
            "plan_deployment": result.plan_deployment,
            "outputs": {k: {"shape": list(v.shape), "dtype": v.dtype.str, "values": v.tolist()}
                        for k, v in result.outputs.items()},
            "hops": [h.model_dump() for h in result.hops],
        }))
        return
    ran = f", plan {result.plan} ({result.plan_deployment})" if result.plan else ""
    table = Table(title=f"job {result.job_id}: {result.latency_s * 1e3:.1f} ms in the cluster, "
                        f"{wall * 1e3:.1f} ms seen by this client{ran}")
    for col in ("hop", "server", "transfer ms", "join wait ms", "queue ms", "compute ms", "batch"):
        table.add_column(col, justify="left" if col in ("hop", "server") else "right", no_wrap=col == "server")
    for h in result.hops:
        table.add_row(h.part, h.server, f"{h.transfer_s * 1e3:.2f}", f"{h.join_wait_s * 1e3:.2f}",
                      f"{h.queue_wait_s * 1e3:.2f}", f"{h.compute_s * 1e3:.2f}", str(h.batch))
    console.print(table)
    for name, v in result.outputs.items():
        flat = v.reshape(-1)
        top = int(np.argmax(flat)) if flat.size and v.dtype.kind == "f" else None
        extra = f", argmax {top} ({flat[top]:.4g})" if top is not None else ""
        console.print(f"{name}: shape {tuple(v.shape)} {v.dtype}{extra}", highlight=False)
    if out is not None:
        console.print(f"outputs saved to {out}")


def _open_store(url: Optional[str]) -> ResultStore:
    try:
        url = url or cluster_settings().results_url()
        return ResultStore(url)
    except StoreURLError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # sqlite3 errors: unreadable file, not a database
        raise UserError(f"cannot open result store {url}: {exc}") from None


def _hops_text(hops: list) -> str:
    """`part0@s1 4.5ms (+7.3 wait)`: compute, and transfer + join wait + queue before it; a hop without compute
    (the job's trip in, the result's trip back) shows its transfer alone."""
    parts = []
    for hop in hops or []:
        if not isinstance(hop, dict):
            continue
        where = hop.get("part") or "?"
        if hop.get("server"):
            where += f"@{hop['server']}"
        compute = hop.get("compute_s") or 0.0
        wait = (hop.get("queue_wait_s") or 0) + (hop.get("transfer_s") or 0) + (hop.get("join_wait_s") or 0)
        if compute:
            parts.append(f"{where} {compute * 1e3:.1f}ms" + (f" (+{wait * 1e3:.1f} wait)" if wait else ""))
        else:
            parts.append(f"{where} {wait * 1e3:.1f}ms")
    return ", ".join(parts)


def _results_table(rows, title: str) -> Table:
    table = Table(title=title)
    for col in ("#", "job", "kind", "deployment / plan", "latency ms", "where the time went / error"):
        table.add_column(col, justify="right" if col in ("#", "latency ms") else "left",
                         no_wrap=col in ("job", "kind", "deployment / plan"))
    for r in rows:
        detail = f"[red]{r.code}[/]: {r.message}" if r.kind == "error" else _hops_text(r.hops)
        table.add_row(
            str(r.id), r.job_id or "-", "[green]result[/]" if r.kind == "result" else "[red]error[/]",
            (r.deployment or "-") + (f" / {r.plan}" if r.plan else ""),
            "-" if r.latency_s is None else f"{r.latency_s * 1e3:.1f}", detail,
        )
    return table


@app.command()
@user_errors
def results(
    job: Optional[str] = typer.Option(None, "--job", help="only this job id"),
    kind: Optional[str] = typer.Option(None, "--kind", help="result or error"),
    deployment: Optional[str] = typer.Option(None, "--deployment", "-d", help="only this deployment's rows"),
    limit: int = typer.Option(20, "--limit", help="newest N rows (0: all)"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new rows until Ctrl-C"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    all_namespaces: bool = typer.Option(False, "--all-namespaces", help="rows of every namespace in the store"),
    store: Optional[str] = typer.Option(None, "--store", help="result store URL (default: SPLITINFER_RESULT_STORE_URL)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
):
    """Show stored results and errors (read from the result store; no broker needed)."""
    if kind not in (None, "result", "error"):
        raise UserError(f"--kind must be 'result' or 'error', not {kind!r}")
    if limit < 0:
        raise UserError("--limit must be >= 0")
    ns = None if all_namespaces else cluster_settings(namespace).namespace
    with _open_store(store) as db:
        rows = db.query(ns, job_id=job, kind=kind, deployment=deployment, limit=limit or None, newest_first=True)
        rows.reverse()
        if as_json:
            for r in rows:
                print(json.dumps(r.to_json()), flush=True)
        elif rows or not follow:
            console.print(_results_table(rows, f"results in namespace {ns or '(all)'}: {len(rows)} shown, "
                                               f"{db.count(ns)} stored"))
        if not follow:
            return
        last = max([r.id for r in rows], default=0)
        if not rows:
            newest = db.query(ns, limit=1, newest_first=True)
            last = newest[0].id if newest else 0
        # Ctrl-C or SIGTERM ends the loop at its next poll: a flag, not a KeyboardInterrupt that could land
        # inside sqlite or a half-written line
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.is_set():
            new = [r for r in db.query(ns, job_id=job, kind=kind, deployment=deployment, after_id=last)]
            if new:
                last = new[-1].id
                if as_json:
                    for r in new:
                        print(json.dumps(r.to_json()), flush=True)
                else:
                    console.print(_results_table(new, ""))
            else:
                stop.wait(0.5)
