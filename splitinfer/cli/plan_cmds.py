"""plan, undeploy, and `deploy MODEL`: the optimizer's commands.

`splitinfer plan` plans offline (this machine's profile, a cluster description); `splitinfer deploy MODEL` asks the
optimizer actor, which plans from live monitor state and deploys every plan of the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from splitinfer.cli.app import UserError, app, console, user_errors
from splitinfer.cli.profile_cmds import MODEL_HELP, SHAPE_HELP, _progress, _set_threads

OBJECTIVE_HELP = "latency (fastest plan first), energy (least device energy within the SLA), throughput (pipelined)"
SLA_HELP = "every plan must be predicted within this latency: 50ms, 0.05s or 50 (ms)"

# `splitinfer plan` without --cluster: a phone-class device 4x slower than this machine (on battery), an edge box
# 2x slower, a cloud server as fast; the device reaches the edge over 20 Mbit/s, the edge the cloud over a fast WAN.
EXAMPLE_CLUSTER = """
front_end_site = "device"
[[servers]]
id = "device"
site = "device"
slowdown = 4.0
power = {compute_w = 2.5, radio_w = 1.2, idle_w = 0.3}
[[servers]]
id = "edge"
site = "edge"
slowdown = 2.0
[[servers]]
id = "cloud"
site = "cloud"
[links]
device-edge = {rtt_ms = 10, bandwidth_mbps = 20}
edge-cloud = {rtt_ms = 20, bandwidth_mbps = 1000}
device-cloud = {rtt_ms = 30, bandwidth_mbps = 20}
"""


def _duration(text: Optional[str], flag: str) -> Optional[float]:
    from splitinfer.planner import PlanError, parse_duration

    try:
        return parse_duration(text)
    except PlanError as exc:
        raise UserError(f"{flag}: {exc}") from None


def _objective(objective: str) -> str:
    from splitinfer.planner import OBJECTIVES

    if objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    return objective


def cluster_from_config(cfg, client_site: Optional[str] = None):
    """A cluster.toml (actors.supervisor.ClusterConfig) as the planner's Cluster, in this machine's reference
    seconds: a server's speed is 1 / its slowdown; links as configured (symmetric); the client at front_end_site."""
    from splitinfer.monitor.links import split_pair
    from splitinfer.planner import BrokerOverhead, LinkFigures, PowerProfile, ServerDesc, build_cluster, combine_links
    from splitinfer.settings import get_settings

    settings = get_settings()
    servers = [ServerDesc(pid, spec.site, speed=1.0 / spec.slowdown,
                          memory=int(spec.memory_mb * 1e6) if spec.memory_mb else None,
                          power=PowerProfile(**spec.power.model_dump()) if spec.power
                          else (PowerProfile(**settings.power.model_dump())
                                if (spec.battery if spec.battery is not None else spec.site == "device") else None))
               for spec in cfg.servers for pid in spec.process_ids()]
    if not servers:
        raise UserError("the cluster description has no [[servers]]")
    site = client_site if client_site is not None else (cfg.front_end_site or servers[0].site)
    broker = BrokerOverhead(per_message=settings.broker_per_message_ms / 1e3,
                            per_byte=settings.broker_per_mb_ms / 1e3 / 1e6)

    def figures(spec) -> LinkFigures:
        return LinkFigures(spec.rtt_ms / 1e3, None if spec.bandwidth_mbps is None else spec.bandwidth_mbps * 1e6 / 8)

    configured = {split_pair(k): figures(v) for k, v in cfg.links.items()}
    default = figures(cfg.default_link) if cfg.default_link is not None else None
    links = combine_links([], configured, default, {s.site for s in servers} | {site}, broker)
    return build_cluster(servers, site, links=links, broker=broker)


def plan_table_rows(table: dict) -> Table:
    """The plan table as people read it: route, cuts, predicted latency, device energy, fidelity, throughput."""
    out = Table(title=f"plan table of {table.get('name') or table['model']} (objective {table.get('objective')}, "
                      f"client {table['client']}"
                      + (f", SLA {table['sla'] * 1e3:.3g} ms" if table.get("sla") else "") + ")")
    for col in ("plan", "route", "cut tensors", "latency ms", "device energy mJ", "fidelity", "throughput /s",
                "fallback for"):
        out.add_column(col, justify="right" if col in ("latency ms", "device energy mJ", "fidelity",
                                                       "throughput /s") else "left", overflow="fold")
    for p in table["plans"]:
        route = " -> ".join(part["server"] for part in p["parts"])
        codec = ", ".join(f"{t}:{c}" for t, c in p["compression"].items())
        cuts = ", ".join(p["cuts"][:3]) + (f" (+{len(p['cuts']) - 3})" if len(p["cuts"]) > 3 else "")
        star = " *" if p["id"] == table.get("primary") else ""
        out.add_row(f"{p['id']}{star}", route, cuts + (f" [{codec}]" if codec else "") or "-",
                    f"{p['latency'] * 1e3:.1f}", f"{p['energy'] * 1e3:.1f}", f"{p['fidelity']:.4g}",
                    f"{1.0 / p['bottleneck']:.1f}" if p["bottleneck"] > 0 else "-",
                    ", ".join(p.get("fallback_for") or []) or "-")
    return out


@app.command()
@user_errors
def plan(
    model: str = typer.Argument(..., help=MODEL_HELP),
    cluster: Optional[Path] = typer.Option(None, "--cluster", "-c",
                                           help="cluster.toml (servers with site, slowdown, power, memory_mb; "
                                                "[links]); default: an example device/edge/cloud cluster"),
    objective: str = typer.Option("latency", "--objective", help=OBJECTIVE_HELP),
    sla: Optional[str] = typer.Option(None, "--sla", help=SLA_HELP),
    client_site: Optional[str] = typer.Option(None, "--client-site", help="where inputs start (default: "
                                                                          "front_end_site of the cluster)"),
    compression: bool = typer.Option(False, "--compression", help="allow float16/int8 at cuts (measures fidelity)"),
    max_plans: int = typer.Option(6, "--max-plans", help="plans kept in the table"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=SHAPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="the plan table as JSON on stdout"),
):
    """Plan MODEL offline on a cluster description: the plan table a deploy would get (nothing is started)."""
    from splitinfer.actors.supervisor import ClusterConfig, ClusterError

    sla_s = _duration(sla, "--sla")
    _objective(objective)
    if max_plans < 1:
        raise UserError("--max-plans must be at least 1")
    try:
        if cluster is not None:
            cfg = ClusterConfig.load(cluster)
        else:
            import tomllib

            cfg = ClusterConfig.model_validate(tomllib.loads(EXAMPLE_CLUSTER))
    except ClusterError as exc:
        raise UserError(str(exc)) from None
    planner_cluster = cluster_from_config(cfg, client_site)
    _set_threads(None)
    from splitinfer.monitor import profile_model
    from splitinfer.planner import cost_graph_from_profile, plan_deployment
    from splitinfer.splitter import ModelGraph, load_source_model, parse_shape

    graph = ModelGraph(load_source_model(model, parse_shape(input_shape)))
    with _progress(as_json) as progress:
        task = progress.add_task("profiling (cached)", total=None)

        def report(what: str, done: int, total: int) -> None:
            progress.update(task, description=what, completed=done, total=total)

        profile = profile_model(graph, progress=report)
        fidelity = None
        if compression:
            from splitinfer.monitor import measure_compression

            progress.update(task, description="fidelity of compressed cuts", completed=0, total=None)
            fidelity = measure_compression(graph).fidelity_table()
    table = plan_deployment(cost_graph_from_profile(graph, profile), planner_cluster, objective, sla=sla_s,
                            compression=fidelity, max_plans=max_plans, name=graph.model.name)
    doc = table.to_json()
    if as_json:
        print(json.dumps(doc))
        return
    console.print(plan_table_rows(doc))
    console.print("* the objective's best plan; predicted on this machine's profile scaled by each server's slowdown",
                  style="dim")


def deploy_model_command(target: str, *, name: Optional[str], objective: str, sla: Optional[str],
                         servers: Optional[str], input_shape: Optional[str], compression: bool, max_plans: int,
                         client_site: Optional[str], timeout: float, settings, as_json: bool) -> None:
    """`splitinfer deploy MODEL ...`: the optimizer plans, splits and deploys; print its plan table."""
    from splitinfer.actors.client import Client
    from splitinfer.cli.runtime_cmds import _client_errors
    from splitinfer.splitter.build import APPLICATIONS_PREFIX, parse_shape
    from splitinfer.splitter.graph import SplitError

    _objective(objective)
    sla_s = _duration(sla, "--sla")
    if max_plans < 1:
        raise UserError("--max-plans must be at least 1")
    if not target.startswith(APPLICATIONS_PREFIX):
        path = Path(target)
        if not path.exists():
            raise UserError(f"{target} is not a split directory, a .keras file or keras.applications:NAME")
        if path.suffix != ".keras" or not path.is_file():
            raise UserError(f"{target} is not a split directory (no manifest.json) nor a .keras file")
    try:
        shape = list(parse_shape(input_shape)) if input_shape else None
    except SplitError as exc:
        raise UserError(str(exc)) from None
    wanted = [s.strip() for s in (servers or "").split(",") if s.strip()]

    async def run():
        async with Client(settings) as c:
            with console.status(f"deploying {target}: profile, plan, split, load", spinner="dots") \
                    if not as_json else _quiet():
                return await c.deploy_model(target, name, objective=objective, sla_s=sla_s, servers=wanted,
                                            input_shape=shape, compression=compression, max_plans=max_plans,
                                            client_site=client_site, timeout=timeout)

    result = _client_errors(run())
    if as_json:
        print(json.dumps(result))
        return
    console.print(plan_table_rows(result["table"]))
    console.print(f"deployed {result['name']}: {len(result['table']['plans'])} plan(s), each a deployment "
                  f"{result['name']}:<plan>; jobs to {result['name']} get a plan chosen per job "
                  f"(`splitinfer infer -d {result['name']} --max-latency 50ms --battery 0.3 ...`)", highlight=False)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@app.command()
@user_errors
def undeploy(
    name: str = typer.Argument(..., help="a model deployment (from `splitinfer deploy MODEL`)"),
    namespace: Optional[str] = typer.Option(None, "--namespace"),
    broker_url: Optional[str] = typer.Option(None, "--broker-url"),
):
    """Unload every plan of a model deployment from the servers and delete it from the model pool."""
    from splitinfer.actors.client import Client
    from splitinfer.cli.runtime_cmds import _client_errors, _settings

    async def run():
        async with Client(_settings(namespace, broker_url)) as c:
            return await c.undeploy(name)

    console.print(_client_errors(run()), highlight=False)
