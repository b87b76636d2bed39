"""Supervisor: `splitinfer up [--config cluster.toml]` runs a cluster's actor processes and keeps them running.

- Reads a cluster description (`config.ClusterConfig`): namespace, broker URL, servers (id, site, replicas).
- Makes sure a broker answers (`broker.ensure_broker`: a private node when none does and RabbitMQ is installed).
- Starts registry, state pool, model pool, result store, optimizer, front end and one model-server process per
  server replica, each as
  `python -m splitinfer.actors.<actor> ...` with SPLITINFER_NAMESPACE / SPLITINFER_BROKER_URL in its environment.
- Restarts a crashed actor with the bounded backoff `retry.RESTART` (the count resets after retry.HEALTHY_AFTER_S of
  healthy running; after that many quick crashes in a row it gives up on that actor and says so).
- One supervisor per namespace: it holds the exclusive queue `<ns>.supervisor` for as long as it runs, so a second
  `splitinfer up` on a live namespace is refused with a clear error (the lock goes with the holder's connection,
  also after a kill -9).
- A restarted model server (a crash, or a restart of `up`) loads the parts it hosted again by itself
  (model_server.desired): deployments survive restarts without a redeploy.
- Stops everything cleanly on Ctrl-C / SIGTERM: SIGTERM to each child (own session, so the terminal's SIGINT
  reaches only the supervisor), SIGKILL after a grace period, then the private broker if it started one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiormq.exceptions

from splitinfer.actors.supervisor.broker import BrokerError, PrivateBroker, ensure_broker
from splitinfer.actors.transport import Session, masked
from splitinfer.actors.transport.retry import HEALTHY_AFTER_S, RESTART
from splitinfer.config import ClusterConfig, ConfigError, Settings, get_settings


class NamespaceInUse(BrokerError):
    """Another supervisor runs this namespace."""


STOP_GRACE_S = 15.0  # a stopping actor gets this long after SIGTERM, then SIGKILL


@dataclass
class ActorProcess:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_crashes: int = 0
    gave_up: bool = False
    history: list[tuple[float, int]] = field(default_factory=list)  # (time, exit code) of each exit

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def actor_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"splitinfer.actors.{module}", *args]


def plan_actors(config: ClusterConfig) -> list[tuple[str, list[str]]]:
    """(name, argv) of every process the cluster runs, in start order (control plane first)."""
    out: list[tuple[str, list[str]]] = []
    if config.registry:
        out.append(("registry", actor_argv("registry")))
    if config.state_pool:
        out.append(("state_pool", actor_argv("state_pool")))
    if config.model_pool:
        out.append(("model_pool", actor_argv("model_pool")))
    if config.result_store:
        out.append(("result_store", actor_argv("result_store")))
    if config.optimizer:
        out.append(("optimizer", actor_argv("optimizer")))
    for spec in config.servers:
        for pid in spec.process_ids():
            extra: list[str] = []
            if spec.slowdown != 1.0:
                extra += ["--slowdown", str(spec.slowdown)]
            if spec.battery is not None:
                extra.append("--battery" if spec.battery else "--no-battery")
            if spec.power is not None:
                extra += ["--power", f"{spec.power.compute_w},{spec.power.radio_w},{spec.power.idle_w}"]
            if spec.memory_mb is not None:
                extra += ["--memory-limit-mb", str(spec.memory_mb)]
            out.append((f"server:{pid}", actor_argv("model_server", "--id", pid, "--site", spec.site,
                                                    "--capacity", str(spec.capacity), *extra)))
    if config.front_end:
        site = ["--site", config.front_end_site] if config.front_end_site else []
        out.append(("front_end", actor_argv("front_end", *site)))
    return out


class Supervisor:
    """Runs and watches the actor processes. Use from asyncio: `await sup.start()`, `await sup.run_until_stopped()`,
    `await sup.stop()`; or `splitinfer up`."""

    def __init__(self, config: ClusterConfig, settings: Settings | None = None, run_dir: Path | None = None,
                 say: Callable[[str], None] = print, allow_private_broker: bool | None = None,
                 extra_env: dict[str, str] | None = None):
        self.config = config
        self.settings = settings or get_settings()
        self.namespace = config.namespace or self.settings.namespace
        self.broker_url = config.broker_url or self.settings.broker_url
        self.run_dir = Path(run_dir or self.settings.cache_dir / "run" / self.namespace)
        self.say = say
        # a broker that does not answer is an error, unless a private one was asked for (config or caller)
        self.allow_private_broker = config.private_broker if allow_private_broker is None else allow_private_broker
        self.extra_env = dict(extra_env or {})
        self.private_broker: PrivateBroker | None = None
        self.actors: dict[str, ActorProcess] = {}
        self._watchers: list[asyncio.Task] = []
        self._stopping = False
        self._stopped = asyncio.Event()
        self._session: Session | None = None

    # -- lifecycle
    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        self.broker_url, self.private_broker = await asyncio.to_thread(
            ensure_broker, self.broker_url, self.config.private_broker_port,
            self.settings.cache_dir / "broker" / str(self.config.private_broker_port), self.say,
            self.allow_private_broker,
        )
        await self._hold_namespace()
        env = {
            **os.environ,
            **self.extra_env,
            **self.config.link_env(),
            "SPLITINFER_NAMESPACE": self.namespace,
            "SPLITINFER_BROKER_URL": self.broker_url,
            "SPLITINFER_QUEUE_TYPE": self.settings.queue_type,  # every actor of a namespace declares queues alike
            "PYTHONUNBUFFERED": "1",
        }
        for k, (name, argv) in enumerate(plan_actors(self.config)):
            own = {"SPLITINFER_METRICS_PORT": str(self.config.metrics_port + k)} if self.config.metrics_port else {}
            actor = ActorProcess(name, argv, {**env, **own}, self.run_dir / "logs" / f"{name.replace(':', '-')}.log")
            self.actors[name] = actor
            await self._spawn(actor)
            self._watchers.append(asyncio.create_task(self._watch(actor), name=f"watch {name}"))
        self.say(f"cluster {self.namespace!r} up: {len(self.actors)} actor processes, broker {masked(self.broker_url)},"
                 f" logs in {self.run_dir / 'logs'}")

    async def _spawn(self, actor: ActorProcess) -> None:
        log = open(actor.log_path, "ab")
        try:
            actor.proc = await asyncio.create_subprocess_exec(
                *actor.argv, env=actor.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        actor.started_at = time.monotonic()

    async def _watch(self, actor: ActorProcess) -> None:
        while True:
            assert actor.proc is not None
            code = await actor.proc.wait()
            actor.history.append((time.time(), code))
            if self._stopping:
                return
            up_for = time.monotonic() - actor.started_at
            actor.quick_crashes = 0 if up_for >= HEALTHY_AFTER_S else actor.quick_crashes + 1
            if actor.quick_crashes >= RESTART.attempts:
                actor.gave_up = True
                self.say(f"{actor.name} crashed {actor.quick_crashes} times in a row (last exit {code}); "
                         f"giving up on it, see {actor.log_path}")
                return
            delay = RESTART.delay(max(1, actor.quick_crashes))
            self.say(f"{actor.name} (pid {actor.proc.pid}) exited with code {code} after {up_for:.1f}s; "
                     f"restarting in {delay:.1f}s")
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                return
            if self._stopping:
                return
            actor.restarts += 1
            await self._spawn(actor)

    # -- one control plane per namespace, one process per server id
    async def _hold_namespace(self) -> None:
        """Take the locks (exclusive queues on a session of our own) of what this supervisor runs: the namespace's
        control plane, and each server id; NamespaceInUse when another supervisor, on any machine, holds one."""
        session = Session(self.settings.model_copy(update={"namespace": self.namespace,
                                                          "broker_url": self.broker_url}),
                          f"supervisor-{os.getpid()}")
        await session.open(fail_fast=False)
        self._session = session
        names = session.names
        locks = [(names.supervisor_lock, f"namespace {self.namespace!r} already has a running control plane "
                                         f"(`splitinfer up`)")] if self.config.control_plane else []
        locks += [(names.server_lock(pid), f"server {pid!r} already runs in namespace {self.namespace!r}")
                  for spec in self.config.servers for pid in spec.process_ids()]
        for queue, who in locks:
            try:
                await session.connection.channel.declare_queue(queue, exclusive=True, auto_delete=True)
            except aiormq.exceptions.ChannelLockedResource:
                raise NamespaceInUse(f"{who} (it holds the queue {queue}); stop it first, or pick another "
                                     f"namespace with --namespace" + ("" if queue == names.supervisor_lock else
                                                                      " or another server name")) from None

    async def run_until_stopped(self) -> None:
        """Wait for SIGINT/SIGTERM, then stop everything."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()

    async def stop(self) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        running = [a for a in self.actors.values() if a.running]
        if running:
            self.say(f"stopping {len(running)} actor processes")
        # front end first (stop taking jobs), control plane last
        order = sorted(running, key=lambda a: (a.name != "front_end", a.name in ("registry", "model_pool",
                                                                                 "state_pool", "optimizer")))
        for actor in order:
            with contextlib.suppress(ProcessLookupError):
                actor.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for actor in order:
            try:
                await asyncio.wait_for(actor.proc.wait(), max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self.say(f"{actor.name} did not stop within {STOP_GRACE_S:.0f}s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(actor.proc.pid, signal.SIGKILL)
                await actor.proc.wait()
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
        if self.private_broker is not None:
            await asyncio.to_thread(self.private_broker.stop)
        self.say("all stopped")
        self._stopped.set()

    def status(self) -> list[dict]:
        return [
            {"name": a.name, "pid": a.pid, "running": a.running, "restarts": a.restarts, "gave_up": a.gave_up,
             "log": str(a.log_path)}
            for a in self.actors.values()
        ]

    async def __aenter__(self) -> "Supervisor":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def main(argv: list[str] | None = None) -> None:
    """`python -m splitinfer.actors.supervisor [--config cluster.toml] [--servers N]`: same as `splitinfer up`."""
    parser = argparse.ArgumentParser(prog="python -m splitinfer.actors.supervisor")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--servers", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        config = ClusterConfig.load(args.config) if args.config else ClusterConfig.default(args.servers or 1)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)

    async def run() -> None:
        sup = Supervisor(config, say=lambda m: print(m, flush=True))
        try:
            await sup.start()
        except BrokerError as exc:
            await sup.stop()
            raise SystemExit(f"error: {exc}")
        await sup.run_until_stopped()

    asyncio.run(run())
