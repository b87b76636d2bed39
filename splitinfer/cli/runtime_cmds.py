"""up, deploy, infer, results, status, demo: the runtime's commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from splitinfer.cli.app import UserError, app, console, user_errors


def _settings(namespace: Optional[str] = None, broker_url: Optional[str] = None):
    from splitinfer.settings import get_settings

    s = get_settings()
    updates = {k: v for k, v in (("namespace", namespace), ("broker_url", broker_url)) if v}
    return s.model_copy(update=updates) if updates else s


NS_HELP = "broker namespace (default: SPLITINFER_NAMESPACE or 'splitinfer')"
BROKER_HELP = "broker URL (default: SPLITINFER_BROKER_URL)"


# ------------------------------------------------------------------------------------------------------------ up

@app.command()
@user_errors
def up(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="cluster.toml: namespace, broker, servers"),
    servers: int = typer.Option(1, "--servers", "-n", help="model servers to start when no --config is given"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
):
    """Start the cluster's actor processes (and a private broker if none answers); keep them running until Ctrl-C."""
    from splitinfer.actors.supervisor import ClusterConfig, ClusterError, Supervisor

    try:
        cfg = ClusterConfig.load(config) if config else ClusterConfig.default(servers)
    except ClusterError as exc:
        raise UserError(str(exc)) from None
    if servers < 1 and config is None:
        raise UserError("--servers must be at least 1")
    settings = _settings(namespace, broker_url)
    if namespace:
        cfg.namespace = namespace
    if broker_url:
        cfg.broker_url = broker_url

    async def run() -> None:
        sup = Supervisor(cfg, settings=settings, say=lambda m: console.print(m, highlight=False))
        try:
            await sup.start()
        except ClusterError as exc:
            await sup.stop()
            raise UserError(str(exc)) from None
        except BaseException:
            await sup.stop()
            raise
        console.print("press Ctrl-C to stop", style="dim")
        await sup.run_until_stopped()

    asyncio.run(run())


# ------------------------------------------------------------------------------------------------------- results

def _open_store(url: Optional[str]):
    from splitinfer.actors.result_store import ResultStore, StoreURLError

    try:
        url = url or _settings().results_url()
        return ResultStore(url)
    except StoreURLError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # sqlite3 errors: unreadable file, not a database
        raise UserError(f"cannot open result store {url}: {exc}") from None


def _hops_text(timings: list) -> str:
    """`part0@s1 4.5ms (+7.3 wait)`: compute, and transfer + join wait + queue before it; a hop without compute
    (the job's trip in, the result's trip back) shows its transfer alone."""
    parts = []
    for hop in timings or []:
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


def _row_json(row) -> dict:
    return row.to_json()


def _results_table(rows, title: str) -> Table:
    table = Table(title=title)
    for col in ("#", "job", "kind", "deployment / plan", "latency ms", "where the time went / error"):
        table.add_column(col, justify="right" if col in ("#", "latency ms") else "left", overflow="fold")
    for r in rows:
        detail = f"[red]{r.code}[/]: {r.message}" if r.kind == "error" else _hops_text(r.timings)
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
    deployment: Optional[str] = typer.Option(None, "--deployment", "-d"),
    limit: int = typer.Option(20, "--limit", "-n", help="newest N rows (0: all)"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new rows until Ctrl-C"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    all_namespaces: bool = typer.Option(False, "--all-namespaces"),
    store: Optional[str] = typer.Option(None, "--store", help="result store URL (default: SPLITINFER_RESULT_STORE_URL)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
):
    """Show stored results and errors (read from the result store; no broker needed)."""
    if kind not in (None, "result", "error"):
        raise UserError(f"--kind must be 'result' or 'error', not {kind!r}")
    if limit < 0:
        raise UserError("--limit must be >= 0")
    ns = None if all_namespaces else _settings(namespace).namespace
    with _open_store(store) as db:
        rows = db.query(ns, job_id=job, kind=kind, deployment=deployment, limit=limit or None, newest_first=True)
        rows.reverse()
        if as_json:
            for r in rows:
                print(json.dumps(_row_json(r)), flush=True)
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
                        print(json.dumps(_row_json(r)), flush=True)
                else:
                    console.print(_results_table(new, ""))
            else:
                stop.wait(0.5)


# ------------------------------------------------------------------------------------- deploy, infer, status

def _client_errors(coro):
    """Run a Client coroutine; the runtime's expected failures become one-line UserErrors."""
    from splitinfer.actors.client import ClientError, JobFailed

    try:
        return asyncio.run(coro)
    except ClientError as exc:
        raise UserError(str(exc)) from None
    except JobFailed as exc:
        raise UserError(f"{exc.error.code}: {exc.error.message}") from None
    except ConnectionError as exc:
        raise UserError(str(exc)) from None
    except TimeoutError as exc:
        raise UserError(str(exc) or "timed out waiting for the cluster") from None


def _parse_placement(text: Optional[str]) -> Optional[dict[str, list[str]]]:
    """`part0=s1,part1=s2+s3`: part1 gets two replicas, on s2 and s3."""
    if not text:
        return None
    out: dict[str, list[str]] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise UserError(f"--placement item {item!r} is not PART=SERVER[+SERVER...]")
        part, servers = item.split("=", 1)
        ids = [s.strip() for s in servers.split("+") if s.strip()]
        if not part.strip() or not ids:
            raise UserError(f"--placement item {item!r} is not PART=SERVER[+SERVER...]")
        out[part.strip()] = ids
    return out


@app.command()
@user_errors
def deploy(
    target: str = typer.Argument(..., help="a split directory (from `splitinfer split`), or a MODEL "
                                           "(keras.applications:NAME or a .keras file) for the optimizer to plan"),
    placement: Optional[str] = typer.Option(None, "--placement", "-p",
                                            help="split: PART=SERVER[+SERVER],...; default round-robin over live servers"),
    replicas: int = typer.Option(1, "--replicas", "-r", help="split: replicas per part (round-robin placement)"),
    deployment: Optional[str] = typer.Option(None, "--deployment", "-d", help="split: deployment id (default: split id)"),
    min_servers: int = typer.Option(1, "--min-servers", help="split: wait until this many servers are live"),
    name: Optional[str] = typer.Option(None, "--name", help="MODEL: the deployment's name (default <model>-<objective>)"),
    objective: str = typer.Option("latency", "--objective",
                                  help="MODEL: latency | energy (least device energy within the SLA) | throughput"),
    sla: Optional[str] = typer.Option(None, "--sla", help="MODEL: every plan must be predicted within it: 50ms, 0.05s"),
    servers: Optional[str] = typer.Option(None, "--servers", help="MODEL: only these servers (comma-separated)"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="MODEL: input shape, e.g. 224x224x3"),
    compression: bool = typer.Option(False, "--compression", help="MODEL: allow float16/int8 tensors at cuts"),
    max_plans: int = typer.Option(6, "--max-plans", help="MODEL: plans in the table (each one is loaded)"),
    client_site: Optional[str] = typer.Option(None, "--client-site", help="MODEL: where inputs start (default: "
                                                                          "the front end's site)"),
    timeout: float = typer.Option(600.0, help="seconds to wait for every part to load"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
    as_json: bool = typer.Option(False, "--json"),
):
    """Deploy a split (upload, load its parts) or a MODEL (the optimizer profiles, plans, splits and loads every
    plan of the plan table); returns when all serve."""
    from splitinfer.actors.client import Client

    settings = _settings(namespace, broker_url)
    directory = Path(target)
    if not (directory / "manifest.json").exists():
        if directory.is_dir():
            raise UserError(f"{directory} is not a split directory (no manifest.json); make one with `splitinfer split`")
        from splitinfer.cli.plan_cmds import deploy_model_command

        deploy_model_command(target, name=name, objective=objective, sla=sla, servers=servers, input_shape=input_shape,
                             compression=compression, max_plans=max_plans, client_site=client_site, timeout=timeout,
                             settings=settings, as_json=as_json)
        return
    if replicas < 1:
        raise UserError("--replicas must be at least 1")
    plan = _parse_placement(placement)

    async def run():
        async with Client(settings) as c:
            with console.status(f"deploying {directory}", spinner="dots") if not as_json else _nullcontext():
                return await c.deploy(directory, plan, replicas, deployment=deployment, min_servers=min_servers,
                                      timeout=timeout)

    dep = _client_errors(run())
    if as_json:
        print(json.dumps({"deployment": dep.deployment, "placement": dep.placement, "inputs": dep.inputs,
                          "outputs": dep.outputs, "load_s": round(dep.load_s, 3)}))
        return
    table = Table(title=f"deployment {dep.deployment}: {len(dep.placement)} parts ready in {dep.load_s:.1f}s")
    table.add_column("part")
    table.add_column("servers (one per replica)")
    for part, servers_ in dep.placement.items():
        table.add_row(part, ", ".join(servers_))
    console.print(table)
    console.print(f"inputs: {', '.join(dep.inputs)}   outputs: {', '.join(dep.outputs)}", highlight=False)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _load_inputs(specs: list[str]) -> dict[str, "object"] | "object":
    """`x.npy` (the model's only input) or `NAME=x.npy` per input; .npy only, never pickled objects."""
    import numpy as np

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
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="save the outputs to this .npz"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
    as_json: bool = typer.Option(False, "--json", help="outputs (values included), hops and latency as JSON"),
):
    """Run one inference job through the front end and print where the time went."""
    import numpy as np

    from splitinfer.actors.client import Client

    if deadline is not None and deadline <= 0:
        raise UserError("--deadline must be positive")
    if battery is not None and not 0.0 <= battery <= 1.0:
        raise UserError("--battery must be between 0 and 1")
    if min_fidelity is not None and not 0.0 < min_fidelity <= 1.0:
        raise UserError("--min-fidelity must be in (0, 1]")
    from splitinfer.cli.plan_cmds import _duration

    budget = _duration(max_latency, "--max-latency")
    x = _load_inputs(inputs)
    settings = _settings(namespace, broker_url)

    async def run():
        async with Client(settings) as c:
            t0 = time.perf_counter()
            result = await c.infer(deployment, x, deadline_s=deadline, max_latency_s=budget, battery=battery,
                                   min_fidelity=min_fidelity)
            return result, time.perf_counter() - t0

    result, wall = _client_errors(run())
    if output is not None:
        np.savez(output, **{k.replace("/", "_").replace(":", "_"): v for k, v in result.outputs.items()})
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
        table.add_column(col, justify="left" if col in ("hop", "server") else "right")
    for h in result.hops:
        table.add_row(h.part, h.server, f"{h.transfer_s * 1e3:.2f}", f"{h.join_wait_s * 1e3:.2f}",
                      f"{h.queue_wait_s * 1e3:.2f}", f"{h.compute_s * 1e3:.2f}", str(h.batch))
    console.print(table)
    for name, v in result.outputs.items():
        flat = v.reshape(-1)
        top = int(np.argmax(flat)) if flat.size and v.dtype.kind == "f" else None
        extra = f", argmax {top} ({flat[top]:.4g})" if top is not None else ""
        console.print(f"{name}: shape {tuple(v.shape)} {v.dtype}{extra}", highlight=False)
    if output is not None:
        console.print(f"outputs saved to {output}")


@app.command()
@user_errors
def status(
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
    as_json: bool = typer.Option(False, "--json"),
):
    """Servers (alive, site, parts hosted, load), deployments with their parts and replicas, queue depths."""
    from splitinfer.actors.topology import Names
    from splitinfer.actors.client import Client

    settings = _settings(namespace, broker_url)
    names = Names(settings.namespace)

    async def run():
        async with Client(settings) as c:
            actors = await c.actors(include_dead=True)
            deployments = await c.deployments()
            queues = [names.jobs, names.dead]
            hosted: dict[tuple[str, str], list[tuple[str, int, int]]] = {}
            for a in actors:
                for p in a.parts:
                    hosted.setdefault((p.deployment, p.part), []).append((a.actor_id, p.replica, p.replicas))
            for (dep, part), reps in sorted(hosted.items()):
                n = max(r[2] for r in reps)
                queues += [names.replica_queue(dep, part, k) for k in range(n)]
            depths = await c.queue_depths(queues)
            return actors, deployments, hosted, depths

    actors, deployments, hosted, depths = _client_errors(run())
    actors = [a for a in actors if a.kind != "client"]
    if as_json:
        print(json.dumps({
            "namespace": names.ns,
            "actors": [a.model_dump() for a in actors],
            "deployments": {d: {part: [{"server": s, "replica": k, "replicas": n} for s, k, n in reps]
                                for (dep, part), reps in sorted(hosted.items()) if dep == d}
                            for d in deployments},
            "queues": depths,
        }))
        return
    table = Table(title=f"actors in namespace {names.ns}")
    for col in ("actor", "kind", "site", "alive", "parts", "load", "cpu %", "processed", "errors"):
        table.add_column(col, justify="right" if col in ("load", "cpu %", "processed", "errors") else "left")
    for a in actors:
        parts = ", ".join(f"{p.part}@r{p.replica}/{p.replicas}" for p in a.parts)
        st = a.state
        table.add_row(a.actor_id, a.kind, a.site or "-", "[green]yes[/]" if a.alive else "[red]no[/]", parts or "-",
                      "-" if st.load is None else f"{st.load:g}",
                      "-" if st.cpu_percent is None else f"{st.cpu_percent:.0f}", str(st.processed), str(st.errors))
    console.print(table)
    dtable = Table(title="deployments")
    for col in ("deployment", "part", "replicas: server"):
        dtable.add_column(col)
    for d in deployments:
        rows = sorted((part, reps) for (dep, part), reps in hosted.items() if dep == d)
        if not rows:
            dtable.add_row(d, "-", "[yellow]in the pool, not loaded[/]")
        for part, reps in rows:
            dtable.add_row(d, part, ", ".join(f"r{k}: {s}" for s, k, _ in sorted(reps, key=lambda r: r[1])))
    console.print(dtable)
    qtable = Table(title="queue depths (messages ready)")
    qtable.add_column("queue")
    qtable.add_column("ready", justify="right")
    for q, n in depths.items():
        qtable.add_row(q, "-" if n is None else str(n))
    console.print(qtable)


# ------------------------------------------------------------------------------------------------------- demo

def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def make_split(model: str, parts: int, out: Path, seed: int = 0):
    """Split `model` into `parts` parts balanced by FLOPs (what `splitinfer split --parts` does)."""
    from splitinfer.monitor import node_flops
    from splitinfer.splitter import ModelGraph, balanced_cuts, load_source_model, save_split, split_at_cuts

    graph = ModelGraph(load_source_model(model, seed=seed))
    specs = split_at_cuts(graph, balanced_cuts(graph, node_flops(graph), parts)) if parts > 1 else \
        split_at_cuts(graph, [])
    return save_split(graph, specs, out, origin=model)


def local_runner(split_dir: Path):
    """The unsplit model from a split directory, compiled (one tf.function), warmed up: fn(x) -> outputs dict."""
    import warnings

    from splitinfer import _tf  # noqa: F401
    import keras

    from splitinfer.splitter import CompiledPart, Manifest

    # Keras notes that a one-input model got its input as a list; the result is the same
    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")

    manifest = Manifest.load(split_dir)
    model = keras.saving.load_model(split_dir / manifest.source.file, safe_mode=True, compile=False)
    part = CompiledPart(model, [t.name for t in manifest.inputs], manifest.output_names)
    return part


def measure_local(run, xs: list, input_name: str) -> dict:
    """Latency of each call in sequence (the same inputs as the distributed run)."""
    for x in xs[:3]:
        run({input_name: x})
    lat, outs = [], []
    t_all = time.perf_counter()
    for x in xs:
        t0 = time.perf_counter()
        outs.append(run({input_name: x}))
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all
    return {"latency": lat, "outputs": outs, "throughput": len(xs) / wall}


async def measure_distributed(client, deployment: str, xs: list, input_name: str, concurrency: int,
                              deadline_s: float = 60.0) -> dict:
    """Send every x as a job, at most `concurrency` in flight; latency per job as the client saw it."""
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = [0.0] * len(xs)
    results: list = [None] * len(xs)

    async def one(i: int, x) -> None:
        async with sem:
            t0 = time.perf_counter()
            results[i] = await client.infer(deployment, {input_name: x}, deadline_s=deadline_s)
            lat[i] = time.perf_counter() - t0

    t_all = time.perf_counter()
    await asyncio.gather(*(one(i, x) for i, x in enumerate(xs)))
    wall = time.perf_counter() - t_all
    return {"latency": lat, "results": results, "throughput": len(xs) / wall}


def max_abs_error(results: list, local_outputs: list) -> float:
    import numpy as np

    worst = 0.0
    for r, ref in zip(results, local_outputs):
        for name, want in ref.items():
            got = r.outputs[name]
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))))
    return worst


ANSWER_HOP = "answer"


def hop_summary(results: list, client_latency: list[float] | None = None) -> list[dict]:
    """Mean per-hop times over results, in path order: where the time went. "job" is the job's trip to the front
    end, "result" the last part's output to the front end; with the client-seen latencies, a last row "answer":
    the answer's trip back to the client plus the client's own work (client latency - cluster latency - job hop)."""
    import numpy as np

    acc: dict[tuple[str, str], list] = {}
    for i, r in enumerate(results):
        for h in r.hops:
            acc.setdefault((h.part, h.server), []).append(
                (h.transfer_s, h.join_wait_s, h.queue_wait_s, h.compute_s, h.batch))
        if client_latency is not None and r.latency_s is not None:
            job_hop = sum(h.transfer_s for h in r.hops if h.part == "job")
            acc.setdefault((ANSWER_HOP, "client"), []).append(
                (max(0.0, client_latency[i] - r.latency_s - job_hop), 0.0, 0.0, 0.0, 1))
    rows = []
    for (part, server), vals in acc.items():
        a = np.asarray(vals, dtype=np.float64)
        rows.append({"part": part, "server": server, "transfer_ms": a[:, 0].mean() * 1e3,
                     "join_wait_ms": a[:, 1].mean() * 1e3, "queue_ms": a[:, 2].mean() * 1e3,
                     "compute_ms": a[:, 3].mean() * 1e3, "mean_batch": a[:, 4].mean()})

    def order(row: dict) -> tuple:
        part = row["part"]
        if part == "job":
            return (0, 0)
        if part.startswith("part") and part[4:].isdigit():
            return (1, int(part[4:]))
        return (2 if part == "result" else 3 if part == ANSWER_HOP else 1, 0)

    return sorted(rows, key=order)


class ClusterRun:
    """The demo's and the benchmark's cluster: a Supervisor (and a private broker if none answers) in this process's
    event loop, in a namespace of its own, with a scratch cache directory (model pool, fetched parts, logs, and the
    result store unless SPLITINFER_RESULT_STORE_URL is set) that is removed after a clean run and kept, with a
    note saying where, after a failed one. Everything it started is stopped on exit."""

    def __init__(self, servers: int, settings, say, queue_expires_s: float = 600.0, config=None):
        from splitinfer.actors.supervisor import ClusterConfig, Supervisor

        self.say = say
        self.scratch = Path(settings.cache_dir) / "scratch" / settings.namespace
        self.settings = settings.model_copy(update={"queue_expires_s": queue_expires_s, "cache_dir": self.scratch,
                                                    "profile_dir": settings.profile_cache()})
        # a given config (sites, slowdowns, emulated links: the bandwidth benchmark) replaces the default servers
        cfg = config.model_copy() if config is not None else ClusterConfig.default(servers)
        cfg.namespace = self.settings.namespace
        self.sup = Supervisor(cfg, settings=self.settings, say=say,
                              extra_env={"SPLITINFER_QUEUE_EXPIRES_S": str(queue_expires_s),
                                         "SPLITINFER_CACHE_DIR": str(self.scratch),
                                         "SPLITINFER_PROFILE_DIR": str(settings.profile_cache())})

    async def __aenter__(self):
        from splitinfer.actors.supervisor import ClusterError

        try:
            await self.sup.start()
        except ClusterError as exc:
            await self.sup.stop()
            raise UserError(str(exc)) from None
        except BaseException:
            await self.sup.stop()
            raise
        # the client must talk to the broker the supervisor settled on (maybe a private one)
        self.settings = self.settings.model_copy(update={"broker_url": self.sup.broker_url})
        return self

    async def __aexit__(self, exc_type, *exc):
        import shutil

        from splitinfer.actors.topology import delete_namespace

        await self.sup.stop()
        await delete_namespace(self.settings.broker_url, self.settings.namespace)  # a scratch namespace
        if exc_type is None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        else:
            self.say(f"actor logs kept in {self.sup.run_dir / 'logs'}")


@app.command()
@user_errors
def demo(
    servers: int = typer.Option(5, "--servers", "-n", help="server processes = parts"),
    model: str = typer.Option("keras.applications:MobileNetV3Large", help="model to split (weights=None)"),
    jobs: int = typer.Option(40, "--jobs", "-j", help="jobs per measurement"),
    concurrency: int = typer.Option(8, "--concurrency", "-c", help="jobs in flight for the throughput run"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="default: a fresh demo namespace"),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
    as_json: bool = typer.Option(False, "--json"),
):
    """Start a cluster of N servers, split MODEL into N parts, deploy, run jobs, compare with the local model."""
    import uuid

    if servers < 1:
        raise UserError("--servers must be at least 1")
    if jobs < 2 or concurrency < 1:
        raise UserError("--jobs must be at least 2 and --concurrency at least 1")
    base = _settings(None, broker_url)
    ns = namespace or f"{base.namespace}.demo{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(update={"namespace": ns})
    say = (lambda m: None) if as_json else (lambda m: console.print(m, highlight=False))
    report = asyncio.run(_demo(servers, model, jobs, concurrency, settings, say))
    if as_json:
        print(json.dumps(report))
        return
    _print_demo(report)


async def _demo(servers: int, model: str, jobs: int, concurrency: int, settings, say) -> dict:
    import tempfile

    import numpy as np

    from splitinfer.actors.client import Client, ClientError, JobFailed

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
        "hops": hop_summary(seq["results"], seq["latency"]),
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
