"""up, server, status, dead, down: start a cluster (or its control plane alone), join a model server to it from
any machine, see what runs in it, its dead letters, remove it from the broker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.table import Table

from splitinfer.actors.supervisor import BrokerError, Supervisor
from splitinfer.actors.transport.topology import control_plane_runs, delete_namespace
from splitinfer.cli.app import (
    BROKER_HELP,
    NS_HELP,
    UserError,
    app,
    client_errors,
    cluster_settings,
    console,
    user_errors,
)
from splitinfer.client import Client
from splitinfer.config import ClusterConfig
from splitinfer.config.cluster import ServerSpec


@app.command()
@user_errors
def up(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="cluster.toml: namespace, broker, servers"),
    servers: int = typer.Option(1, "--servers", help="model servers to start when no --config is given"),
    control_plane: bool = typer.Option(False, "--control-plane",
                                       help="the control plane alone (servers join with `splitinfer server`)"),
    private_broker: bool = typer.Option(False, "--private-broker",
                                        help="start a private RabbitMQ node if no broker answers (else an error)"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
):
    """Start the cluster's actor processes; keep them running until Ctrl-C."""
    cfg = ClusterConfig.load(config) if config else ClusterConfig.default(servers)
    if servers < 1 and config is None:
        raise UserError("--servers must be at least 1")
    if control_plane:
        cfg = cfg.without_servers()
    if private_broker:
        cfg.private_broker = True
    supervise(cfg, namespace, broker_url)


@app.command()
@user_errors
def server(
    name: str = typer.Option(..., "--name", help="the server's id in the cluster (unique in the namespace)"),
    site: str = typer.Option("edge", "--site", help="where it runs: device, edge, cloud, ... (the planner's sites)"),
    broker_url: Optional[str] = typer.Option(None, "--broker", "--broker-url", help=BROKER_HELP),
    capacity: float = typer.Option(1.0, "--capacity", help="relative capacity (the planner's load share)"),
    slowdown: float = typer.Option(1.0, "--slowdown", help="emulate a slower device: compute takes this many times "
                                                          "longer"),
    memory_mb: Optional[float] = typer.Option(None, "--memory-limit-mb", help="weights this server may hold"),
    metrics_port: int = typer.Option(0, "--metrics-port", help="serve /metrics, /healthz, /readyz on this port "
                                                               "(bound to SPLITINFER_METRICS_HOST, default 127.0.0.1)"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
):
    """Run one model server that joins a running cluster from this machine: it registers through the broker, fetches
    its parts from the model pool into its own cache, serves them, and is restarted if it crashes; Ctrl-C stops it."""
    try:
        spec = ServerSpec(id=name, site=site, capacity=capacity, slowdown=slowdown, memory_mb=memory_mb)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"--{'-'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
    if not 0 <= metrics_port <= 65000:
        raise UserError("--metrics-port must be between 0 and 65000")
    supervise(ClusterConfig.server_only(spec, metrics_port=metrics_port), namespace, broker_url)


def supervise(cfg: ClusterConfig, namespace: Optional[str], broker_url: Optional[str]) -> None:
    """Run what `cfg` describes under a supervisor until Ctrl-C (`up`, `server`)."""
    settings = cluster_settings(namespace, broker_url)
    if namespace:
        cfg.namespace = namespace
    if broker_url:
        cfg.broker_url = broker_url

    async def run() -> None:
        sup = Supervisor(cfg, settings=settings, say=lambda m: console.print(m, highlight=False))
        try:
            await sup.start()
        except BrokerError as exc:
            await sup.stop()
            raise UserError(str(exc)) from None
        except BaseException:
            await sup.stop()
            raise
        console.print("press Ctrl-C to stop", style="dim")
        await sup.run_until_stopped()

    asyncio.run(run())


@app.command("broker-users")
@user_errors
def broker_users(
    prefix: Optional[str] = typer.Option(None, "--prefix", help="user names <prefix>-control, -server, -client "
                                                                "(default: the namespace, dots as dashes)"),
    roles: str = typer.Option("control,server,client", "--roles", help="which of control, server, client"),
    node: Optional[str] = typer.Option(None, "--node", help="the RabbitMQ node rabbitmqctl talks to"),
    delete: bool = typer.Option(False, "--delete", help="delete these users instead"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help="the URL the printed ones are built on"),
    as_json: bool = typer.Option(False, "--json", help="{role: {user, url}} as one JSON object"),
):
    """Create one broker user per role for a namespace, with RabbitMQ permissions that fit it (run on the broker
    host: it uses rabbitmqctl); prints each role's broker URL, with its fresh password, once."""
    from urllib.parse import quote, urlsplit, urlunsplit

    from splitinfer.actors.supervisor import users as broker_users_mod
    from splitinfer.actors.transport import broker_urls

    settings = cluster_settings(namespace, broker_url)
    chosen = tuple(r.strip() for r in roles.split(",") if r.strip())
    unknown = [r for r in chosen if r not in broker_users_mod.ROLES]
    if unknown or not chosen:
        raise UserError(f"--roles: {', '.join(unknown) or 'none given'}; choose from "
                        f"{', '.join(broker_users_mod.ROLES)}")
    prefix = prefix or settings.namespace.replace(".", "-")
    try:
        if delete:
            gone = broker_users_mod.delete_users(prefix, chosen, node)
            console.print(f"deleted {len(gone)} broker user(s): {', '.join(gone) or '-'}")
            return
        made = broker_users_mod.create_users(settings.namespace, prefix, chosen, node=node)
    except BrokerError as exc:
        raise UserError(str(exc)) from None

    def url_for(user: str, password: str) -> str:
        out = []
        for u in broker_urls(settings.broker_url):
            p = urlsplit(u)
            host = f"{p.hostname or 'localhost'}{f':{p.port}' if p.port else ''}"
            out.append(urlunsplit((p.scheme, f"{quote(user)}:{quote(password, safe='')}@{host}", p.path or "/",
                                   p.query, "")))
        return ",".join(out)

    urls = {role: {"user": user, "url": url_for(user, password)} for role, (user, password) in made.items()}
    if as_json:
        print(json.dumps(urls))
        return
    table = Table(title=f"broker users of namespace {settings.namespace} (passwords shown once)")
    for col in ("role", "user", "SPLITINFER_BROKER_URL"):
        table.add_column(col, no_wrap=True)
    for role, v in urls.items():
        table.add_row(role, v["user"], v["url"])
    console.print(table)


@app.command()
@user_errors
def status(
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
    as_json: bool = typer.Option(False, "--json", help="everything below as one JSON object"),
):
    """Servers (alive, site, parts hosted, load), deployments with their parts and replicas, queue depths."""
    settings = cluster_settings(namespace, broker_url)

    async def run():
        async with Client(settings) as c:
            names = c.names
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

    actors, deployments, hosted, depths = client_errors(run())
    ns = settings.namespace
    if as_json:
        print(json.dumps({
            "namespace": ns,
            "actors": [a.model_dump() for a in actors],
            "deployments": {d: {part: [{"server": s, "replica": k, "replicas": n} for s, k, n in reps]
                                for (dep, part), reps in sorted(hosted.items()) if dep == d}
                            for d in deployments},
            "queues": depths,
        }))
        return
    table = Table(title=f"actors in namespace {ns}")
    metrics = any(a.state.metrics_url for a in actors)
    for col in ("actor", "kind", "site", "alive", "ready", "parts", "load", "cpu %", "processed", "errors",
                *(("metrics",) if metrics else ())):
        table.add_column(col, justify="right" if col in ("load", "cpu %", "processed", "errors") else "left",
                         no_wrap=col in ("actor", "kind", "metrics"))
    for a in actors:
        parts = ", ".join(f"{p.part}@r{p.replica}/{p.replicas}" for p in a.parts)
        st = a.state
        ready = "-" if not a.alive else "[green]yes[/]" if st.not_ready is None else f"[yellow]{st.not_ready}[/]"
        table.add_row(a.actor_id, a.kind, a.site or "-", "[green]yes[/]" if a.alive else "[red]no[/]", ready,
                      parts or "-", "-" if st.load is None else f"{st.load:g}",
                      "-" if st.cpu_percent is None else f"{st.cpu_percent:.0f}", str(st.processed), str(st.errors),
                      *((st.metrics_url or "-",) if metrics else ()))
    console.print(table)
    dtable = Table(title="deployments")
    for col in ("deployment", "part", "replicas: server"):
        dtable.add_column(col, no_wrap=col == "deployment")
    for d in deployments:
        rows = sorted((part, reps) for (dep, part), reps in hosted.items() if dep == d)
        if not rows:
            dtable.add_row(d, "-", "[yellow]in the pool, not loaded[/]")
        for part, reps in rows:
            dtable.add_row(d, part, ", ".join(f"r{k}: {s}" for s, k, _ in sorted(reps, key=lambda r: r[1])))
    console.print(dtable)
    qtable = Table(title="queue depths (messages ready)")
    qtable.add_column("queue", no_wrap=True)
    qtable.add_column("ready", justify="right")
    for q, n in depths.items():
        qtable.add_row(q, "-" if n is None else str(n))
    console.print(qtable)


@app.command()
@user_errors
def dead(
    show: int = typer.Option(10, "--show", help="list the oldest N dead letters with why they are there"),
    requeue: bool = typer.Option(False, "--requeue", help="send every dead letter back where it was going"),
    purge: bool = typer.Option(False, "--purge", help="delete every dead letter"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
    as_json: bool = typer.Option(False, "--json", help="the listing as one JSON object"),
):
    """The dead-letter queue: messages that could never succeed (bad jobs, poison, unanswerable ids), each with its
    reason; bounded by SPLITINFER_DEAD_LETTER_MAX / _MAX_MB / _TTL_S (the oldest go first)."""
    if requeue and purge:
        raise UserError("--requeue and --purge exclude each other")
    if show < 0:
        raise UserError("--show takes a count >= 0")
    settings = cluster_settings(namespace, broker_url)

    async def run():
        async with Client(settings) as c:
            if requeue:
                return "requeue", await c.requeue_dead_letters()
            if purge:
                return "purge", await c.purge_dead_letters()
            return "show", await c.dead_letters(show)

    what, result = client_errors(run())
    if what == "requeue":
        sent, left = result
        console.print(f"sent {sent} dead letter(s) back where they were going; {left} left (no destination, or "
                      f"unroutable now)")
    elif what == "purge":
        console.print(f"deleted {result} dead letter(s)")
    else:
        total, letters = result
        if as_json:
            print(json.dumps({"namespace": settings.namespace, "count": total,
                              "letters": [dataclasses.asdict(d) for d in letters]}))
            return
        table = Table(title=f"dead letters in {settings.namespace}: {total} (oldest {len(letters)} shown)")
        for col in ("code", "reason", "job", "by", "age", "was going to", "bytes"):
            table.add_column(col, overflow="fold")
        for d in letters:
            age = "-" if d.age_s is None else f"{d.age_s:.0f}s"
            table.add_row(d.code or "-", d.reason or "-", d.job_id[:40] or "-", d.actor or "broker", age,
                          f"{d.exchange or '(default)'} / {d.routing_key}", str(d.size))
        console.print(table)


@app.command()
@user_errors
def down(
    purge: bool = typer.Option(False, "--purge", help="also delete queues that still hold messages (jobs, dead "
                                                      "letters)"),
    namespace: Optional[str] = typer.Option(None, "--namespace", help=NS_HELP),
    broker_url: Optional[str] = typer.Option(None, "--broker-url", help=BROKER_HELP),
):
    """Remove the namespace's queues and exchanges from the broker (after `up` stopped). The model pool's files and
    what each server hosts stay on disk: the next `up` serves the same deployments again."""
    settings = cluster_settings(namespace, broker_url)

    async def run():
        if await control_plane_runs(settings.broker_url, settings.namespace):
            raise UserError(f"`splitinfer up` still runs namespace {settings.namespace!r}: stop it first")
        return await delete_namespace(settings.broker_url, settings.namespace, keep_nonempty=not purge)

    deleted, kept = client_errors(run())
    console.print(f"removed {deleted} queue(s) and exchange(s) of namespace {settings.namespace}")
    if kept:
        console.print(f"kept {len(kept)} queue(s) still holding messages ({', '.join(kept)}); "
                      f"`splitinfer down --purge` deletes them too", style="yellow")
