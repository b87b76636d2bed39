"""deploy, undeploy: put a split or a model on the cluster's servers, and take it off again."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

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
from splitinfer.cli.plan_cmds import KEEP_HELP, OBJECTIVE_HELP, check_objective, plan_table_rows
from splitinfer.client import Client
from splitinfer.config import Settings
from splitinfer.splitter.manifest import APPLICATIONS_PREFIX, MANIFEST_FILE, parse_shape


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


def _busy(text: str, quiet: bool):
    return contextlib.nullcontext() if quiet else console.status(text, spinner="dots")


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
    objective: str = typer.Option("latency", "--objective", help=f"MODEL: {OBJECTIVE_HELP}"),
    sla: Optional[str] = typer.Option(None, "--sla", help="MODEL: every plan must be predicted within it: 50ms, 0.05s"),
    only: Optional[str] = typer.Option(None, "--only", help="MODEL: plan on these servers only (comma-separated ids)"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="MODEL: input shape, e.g. 224x224x3"),
    compression: bool = typer.Option(False, "--compression", help="MODEL: allow float16/int8 tensors at cuts"),
    max_plans: int = typer.Option(6, "--max-plans", help="MODEL: plans in the table (each one is loaded)"),
    keep_on_device: Optional[str] = typer.Option(None, "--keep-on-device", help=f"MODEL: {KEEP_HELP}"),
    client_site: Optional[str] = typer.Option(None, "--client-site", help="MODEL: where inputs start (default: "
                                                                          "the front end's site)"),
    variant: Optional[list[str]] = typer.Option(None, "--variant", help="MODEL: another model for the same jobs, "
                                                "NAME=MODEL[@ACCURACY] (repeat it); accuracy default: its measured "
                                                "agreement with MODEL; jobs pick by --min-accuracy or budget"),
    accuracy: Optional[float] = typer.Option(None, "--accuracy", help="MODEL: its accuracy in (0, 1] when "
                                                                      "--variant is given (default 1)"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds to wait for every part to load"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
    as_json: bool = typer.Option(False, "--json", help="the deployment (or the plan table) as JSON"),
):
    """Deploy a split (upload, load its parts) or a MODEL (the optimizer profiles, plans, splits and loads every
    plan of the plan table); returns when all serve."""
    settings = cluster_settings(namespace, broker_url)
    directory = Path(target)
    if not (directory / MANIFEST_FILE).exists():
        if directory.is_dir():
            raise UserError(f"{directory} is not a split directory (no manifest.json); make one with `splitinfer split`")
        _deploy_model(target, name=name, objective=objective, sla=sla, only=only, input_shape=input_shape,
                      compression=compression, max_plans=max_plans, client_site=client_site, timeout=timeout,
                      settings=settings, as_json=as_json, keep_on_device=keep_on_device,
                      variants=_parse_variants(variant or []), accuracy=accuracy)
        return
    if replicas < 1:
        raise UserError("--replicas must be at least 1")
    plan = _parse_placement(placement)

    async def run():
        async with Client(settings) as c:
            with _busy(f"deploying {directory}", as_json):
                return await c.deploy(directory, plan, replicas, deployment=deployment, min_servers=min_servers,
                                      timeout=timeout)

    dep = client_errors(run())
    if as_json:
        print(json.dumps({"deployment": dep.deployment, "placement": dep.placement, "inputs": dep.inputs,
                          "outputs": dep.outputs, "load_s": round(dep.load_s, 3)}))
        return
    table = Table(title=f"deployment {dep.deployment}: {len(dep.placement)} parts ready in {dep.load_s:.1f}s")
    table.add_column("part", no_wrap=True)
    table.add_column("servers (one per replica)")
    for part, servers_ in dep.placement.items():
        table.add_row(part, ", ".join(servers_))
    console.print(table)
    console.print(f"inputs: {', '.join(dep.inputs)}   outputs: {', '.join(dep.outputs)}", highlight=False)


def _parse_variants(specs: list[str]) -> list[dict]:
    """--variant NAME=MODEL[@ACCURACY] -> [{name, model, accuracy}]; a one-line error for anything else."""
    out = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        model, _, acc = rest.rpartition("@") if "@" in rest else (rest, "", "")
        if not sep or not name or not model or not name.replace("_", "").isalnum():
            raise UserError(f"--variant {spec!r}: use NAME=MODEL[@ACCURACY] (NAME letters, digits, _)")
        try:
            value = float(acc) if acc else None
        except ValueError:
            raise UserError(f"--variant {spec!r}: accuracy {acc!r} is not a number") from None
        if value is not None and not 0.0 < value <= 1.0:
            raise UserError(f"--variant {spec!r}: accuracy must be in (0, 1]")
        if not model.startswith(APPLICATIONS_PREFIX) and not Path(model).is_file():
            raise UserError(f"--variant {spec!r}: {model} is not a .keras file nor keras.applications:NAME")
        out.append({"name": name, "model": model, "accuracy": value})
    return out


def _deploy_model(target: str, *, name: Optional[str], objective: str, sla: Optional[str], only: Optional[str],
                  input_shape: Optional[str], compression: bool, max_plans: int, client_site: Optional[str],
                  timeout: float, settings: Settings, as_json: bool, keep_on_device: Optional[str] = None,
                  variants: list[dict] | None = None, accuracy: Optional[float] = None) -> None:
    """`splitinfer deploy MODEL ...`: the optimizer plans, splits and deploys; print its plan table."""
    check_objective(objective)
    sla_s = duration_option(sla, "--sla")
    if max_plans < 1:
        raise UserError("--max-plans must be at least 1")
    if not target.startswith(APPLICATIONS_PREFIX):
        path = Path(target)
        if not path.exists():
            raise UserError(f"{target} is not a split directory, a .keras file or keras.applications:NAME")
        if path.suffix != ".keras" or not path.is_file():
            raise UserError(f"{target} is not a split directory (no manifest.json) nor a .keras file")
    shape = list(parse_shape(input_shape)) if input_shape else None
    wanted = [s.strip() for s in (only or "").split(",") if s.strip()]

    async def run():
        async with Client(settings) as c:
            with _busy(f"deploying {target}: profile, plan, split, load", as_json):
                return await c.deploy_model(target, name, objective=objective, sla_s=sla_s, servers=wanted,
                                            input_shape=shape, compression=compression, max_plans=max_plans,
                                            client_site=client_site, timeout=timeout,
                                            keep_on_device=keep_on_device, variants=variants or [],
                                            accuracy=accuracy)

    result = client_errors(run())
    if as_json:
        print(json.dumps(result))
        return
    console.print(plan_table_rows(result["table"]))
    console.print(f"deployed {result['name']}: {len(result['table']['plans'])} plan(s), each a deployment "
                  f"{result['name']}:<plan>; jobs to {result['name']} get a plan chosen per job "
                  f"(`splitinfer infer -d {result['name']} --max-latency 50ms --battery 0.3 ...`)", highlight=False)


@app.command()
@user_errors
def undeploy(
    name: str = typer.Argument(..., help="a deployment: a split (`splitinfer deploy SPLIT_DIR`) or a model"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
):
    """Unload a deployment (a split, or every plan of a model) from the servers and delete it from the model pool."""

    async def run():
        async with Client(cluster_settings(namespace, broker_url)) as c:
            return await c.undeploy(name)

    console.print(client_errors(run()), highlight=False)
