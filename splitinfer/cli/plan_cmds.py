"""plan: plan a model offline on a cluster description, the plan table a deploy would get (nothing is started).

`splitinfer deploy MODEL` (deploy_cmds) asks the optimizer actor instead, which plans from live monitor state and
deploys every plan of the table; both print the table with `plan_table_rows`.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from splitinfer.cli.app import MODEL_HELP, SHAPE_HELP, UserError, app, console, duration_option, progress_bar, user_errors
from splitinfer.cli.profile_cmds import measure_threads
from splitinfer.config import ClusterConfig, get_settings
from splitinfer.messages import OBJECTIVES
from splitinfer.planner import BrokerOverhead, cluster_from_config, cost_graph_from_profile, plan_deployment

OBJECTIVE_HELP = "latency (fastest plan first), energy (least device energy within the SLA), throughput (pipelined)"
KEEP_HELP = ("a privacy floor: the first K operations (an integer), or every operation up to a tensor, run on the "
             "client's device site; no plan sends what comes before it off the device")
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


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    return objective


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
        route = " -> ".join(part["server"] + (f" [{part['runtime']}]" if part.get("runtime") else "")
                            for part in p["parts"])
        if p.get("variant"):  # a table over model variants: which one, and its accuracy
            route = f"{p['variant']} ({p['accuracy']:.3g}): {route}" if p.get("accuracy") is not None else \
                f"{p['variant']}: {route}"
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
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="cluster.toml (servers with site, slowdown, power, memory_mb; "
                                               "[links]); default: an example device/edge/cloud cluster"),
    objective: str = typer.Option("latency", "--objective", help=OBJECTIVE_HELP),
    sla: Optional[str] = typer.Option(None, "--sla", help=SLA_HELP),
    client_site: Optional[str] = typer.Option(None, "--client-site", help="where inputs start (default: "
                                                                          "front_end_site of the cluster)"),
    compression: bool = typer.Option(False, "--compression", help="allow float16/int8 at cuts (measures fidelity)"),
    max_plans: int = typer.Option(6, "--max-plans", help="plans kept in the table"),
    keep_on_device: Optional[str] = typer.Option(None, "--keep-on-device", help=KEEP_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=SHAPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="the plan table as JSON on stdout"),
):
    """Plan MODEL offline on a cluster description: the plan table a deploy would get (nothing is started)."""
    sla_s = duration_option(sla, "--sla")
    check_objective(objective)
    if max_plans < 1:
        raise UserError("--max-plans must be at least 1")
    cfg = ClusterConfig.load(config) if config is not None else ClusterConfig.model_validate(
        tomllib.loads(EXAMPLE_CLUSTER))
    settings = get_settings()
    planner_cluster = cluster_from_config(
        cfg, client_site, broker=BrokerOverhead.from_ms(settings.broker_per_message_ms, settings.broker_per_mb_ms),
        default_power=settings.power)
    measure_threads(None)
    from splitinfer.monitor import measure_compression, profile_model  # lazy: load TensorFlow
    from splitinfer.splitter import ModelGraph, load_source_model, parse_shape

    graph = ModelGraph(load_source_model(model, parse_shape(input_shape)))
    with progress_bar(as_json) as progress:
        task = progress.add_task("profiling (cached)", total=None)

        def report(what: str, done: int, total: int) -> None:
            progress.update(task, description=what, completed=done, total=total)

        profile = profile_model(graph, progress=report)
        fidelity = None
        if compression:
            progress.update(task, description="fidelity of compressed cuts", completed=0, total=None)
            fidelity = measure_compression(graph).fidelity_table()
    table = plan_deployment(cost_graph_from_profile(graph, profile).keep_on_device(keep_on_device), planner_cluster,
                            objective, sla=sla_s,
                            compression=fidelity, max_plans=max_plans, name=graph.name)
    doc = table.to_json()
    if as_json:
        print(json.dumps(doc))
        return
    console.print(plan_table_rows(doc))
    console.print("* the objective's best plan; predicted on this machine's profile scaled by each server's slowdown",
                  style="dim")
