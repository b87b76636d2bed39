"""Supervisor: `splitinfer up [--config cluster.toml]` runs a cluster's actor processes and keeps them running.

- Reads a cluster description (TOML, see `ClusterConfig`): namespace, broker URL, servers (id, site, replicas).
- Makes sure a broker answers: if none does at the configured URL and `rabbitmq-server` is installed, starts a
  private one (own node name, port, data directory, the project's rabbitmq.conf, the consistent-hash plugin
  enabled) and says so. A reused broker without the consistent-hash exchange type gets the plugin enabled when
  it runs on this machine, else a clear error.
- Starts registry, state pool, model pool, result store, optimizer, front end and one model-server process per
  server replica, each as
  `python -m splitinfer.actors.<actor> ...` with SPLITINFER_NAMESPACE / SPLITINFER_BROKER_URL in its environment.
- Restarts a crashed actor with bounded exponential backoff (0.5 s doubling to 10 s; the count resets after a
  minute of healthy running; after MAX_RESTARTS quick crashes in a row it gives up on that actor and says so).
- A restarted model server comes back empty: the supervisor asks the registry what the crashed one hosted (it
  still lists it for a while) and orders the new process to load the same parts (LoadPart on `load.<id>`; the
  order waits in the server's durable control queue until the new process consumes it).
- Stops everything cleanly on Ctrl-C / SIGTERM: SIGTERM to each child (own session, so the terminal's SIGINT
  reaches only the supervisor), SIGKILL after a grace period, then the private broker if it started one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field, ValidationError, field_validator

from splitinfer.messages import LinkSpec, PowerSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
RABBITMQ_CONF = REPO_ROOT / "rabbitmq.conf"
HASH_PLUGIN = "rabbitmq_consistent_hash_exchange"

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
HEALTHY_AFTER_S = 60.0
MAX_RESTARTS = 8
STOP_GRACE_S = 15.0


class ClusterError(Exception):
    """A cluster description or broker problem the user can fix (shown as one line by the CLI)."""


# --------------------------------------------------------------------------------------------- cluster description

class ServerSpec(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    site: str = "edge"
    replicas: int = Field(1, ge=1, le=64, description="processes for this server entry: ids <id>-1..<id>-k if k>1")
    capacity: float = Field(1.0, gt=0)
    slowdown: float = Field(1.0, ge=1.0, description="emulate a slower device: compute takes this many times longer")
    battery: bool | None = Field(None, description="report a battery level (default: only at site 'device')")
    power: PowerSpec | None = Field(None, description="the simulated battery's power figures (watts)")
    memory_mb: float | None = Field(None, gt=0, description="weights this server may hold (the planner's limit)")

    def process_ids(self) -> list[str]:
        return [self.id] if self.replicas == 1 else [f"{self.id}-{k}" for k in range(1, self.replicas + 1)]


class ClusterConfig(BaseModel):
    """```toml
    namespace = "splitinfer"                      # optional, else settings
    broker_url = "amqp://guest:guest@localhost:5672/"  # optional, else settings
    private_broker_port = 5673                    # used only if no broker answers
    front_end = true
    result_store = true
    front_end_site = "device"                     # the client's site (optional)
    emulate_links = true                          # optional, default off (settings.emulate_links)
    [[servers]]
    id = "device"
    site = "device"
    slowdown = 4.0                                # optional: emulate a device 4x slower than this machine
    power = {compute_w = 2.5, radio_w = 1.2, idle_w = 0.3}   # optional: simulated battery's figures
    [[servers]]
    id = "edge"
    site = "edge"
    replicas = 2                                  # edge-1, edge-2
    [links]                                       # symmetric; unlisted pairs: no delay
    device-edge = {rtt_ms = 40, bandwidth_mbps = 20}
    ```"""

    namespace: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    broker_url: str | None = None
    private_broker_port: int = Field(5673, ge=1024, le=65000)
    front_end: bool = True
    result_store: bool = True
    registry: bool = True
    model_pool: bool = True
    state_pool: bool = True
    optimizer: bool = True
    servers: list[ServerSpec] = Field(default_factory=list)
    # sites and link emulation (off unless emulate_links = true); [links] "siteA-siteB" = {rtt_ms, bandwidth_mbps}
    front_end_site: str = Field("", description="the client's site: jobs' inputs leave from it")
    emulate_links: bool | None = None
    links: dict[str, LinkSpec] = Field(default_factory=dict)
    default_link: LinkSpec | None = None

    @field_validator("links")
    @classmethod
    def _link_keys(cls, links: dict[str, LinkSpec]) -> dict[str, LinkSpec]:
        from splitinfer.monitor.links import split_pair

        for key in links:
            split_pair(key)
        return links

    def link_env(self) -> dict[str, str]:
        """SPLITINFER_* variables that carry the link emulation to every actor process (none when not set)."""
        env: dict[str, str] = {}
        if self.emulate_links is not None:
            env["SPLITINFER_EMULATE_LINKS"] = "true" if self.emulate_links else "false"
        if self.links:
            env["SPLITINFER_LINKS"] = json.dumps({k: v.model_dump() for k, v in self.links.items()})
        if self.default_link is not None:
            env["SPLITINFER_DEFAULT_LINK"] = self.default_link.model_dump_json()
        return env

    @field_validator("servers")
    @classmethod
    def _unique_ids(cls, servers: list[ServerSpec]) -> list[ServerSpec]:
        seen: set[str] = set()
        for s in servers:
            for pid in s.process_ids():
                if pid in seen:
                    raise ValueError(f"server id {pid!r} appears twice")
                seen.add(pid)
        return servers

    @classmethod
    def load(cls, path: Path) -> "ClusterConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterError(f"cluster config not found: {path}") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ClusterError(f"cannot read cluster config {path}: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            raise ClusterError(f"cluster config {path}: {where}: {err['msg']}") from None

    @classmethod
    def default(cls, servers: int = 1, sites: tuple[str, ...] = ("device", "edge", "cloud")) -> "ClusterConfig":
        return cls(servers=[ServerSpec(id=f"s{i + 1}", site=sites[min(i, len(sites) - 1)] if servers <= len(sites)
                                       else sites[i % len(sites)]) for i in range(servers)])


# --------------------------------------------------------------------------------------------------- the broker

def broker_answers(url: str, timeout: float = 3.0) -> bool:
    """True if an AMQP broker accepts a connection at url (a real AMQP handshake, not just an open port)."""

    async def probe() -> bool:
        import logging

        import aio_pika

        for name in ("aio_pika", "aiormq"):  # a refused probe is an answer, not an error worth a log line
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            conn = await asyncio.wait_for(aio_pika.connect(url, timeout=timeout), timeout + 1)
        except Exception:
            return False
        await conn.close()
        return True

    return _run_coro(probe())


def has_hash_exchange(url: str) -> bool:
    """True if the broker knows the x-consistent-hash exchange type (plugin enabled)."""

    async def probe() -> bool:
        import aio_pika

        conn = await aio_pika.connect(url, timeout=5)
        try:
            ch = await conn.channel()
            name = f"splitinfer.probe.{os.getpid()}.{time.monotonic_ns()}"
            try:
                ex = await ch.declare_exchange(name, "x-consistent-hash", auto_delete=True,
                                               arguments={"hash-header": "request_id"})
            except Exception:
                return False
            await ex.delete()
            return True
        finally:
            await conn.close()

    return _run_coro(probe())


def _run_coro(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # called from inside a running loop: run in a helper thread with its own loop
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _is_local(url: str) -> bool:
    host = urlsplit(url).hostname or "localhost"
    return host in ("localhost", "127.0.0.1", "::1", socket.gethostname())


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    creds = netloc[0] + "@" if len(netloc) == 2 else ""
    host = parts.hostname or "localhost"
    return urlunsplit((parts.scheme, f"{creds}{host}:{port}", parts.path or "/", parts.query, parts.fragment))


def _rabbit_bin(name: str) -> str | None:
    """The real RabbitMQ script: Debian's /usr/sbin wrapper switches to the rabbitmq user and hides output."""
    direct = Path("/usr/lib/rabbitmq/bin") / name
    if direct.exists():
        return str(direct)
    return shutil.which(name)


def rabbitmq_installed() -> bool:
    return _rabbit_bin("rabbitmq-server") is not None


def enable_hash_plugin_on_local_broker() -> None:
    """Enable the consistent-hash exchange on the machine's broker (online, no restart)."""
    tool = shutil.which("rabbitmq-plugins")
    if tool is None:
        raise ClusterError(f"the broker lacks the x-consistent-hash exchange; run: rabbitmq-plugins enable {HASH_PLUGIN}")
    proc = subprocess.run([tool, "enable", HASH_PLUGIN], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        first = (proc.stderr or proc.stdout).strip().splitlines()[:1]
        raise ClusterError(f"rabbitmq-plugins enable {HASH_PLUGIN} failed: {first[0] if first else proc.returncode}")


@dataclass
class PrivateBroker:
    """A RabbitMQ node of our own: node name, port, data directory and config are private to it."""

    port: int
    data_dir: Path
    say: Callable[[str], None] = print
    proc: subprocess.Popen | None = None
    dist_port: int = 0  # Erlang distribution port (rabbitmqctl talks to the node on it); chosen free at start

    def _pick_dist_port(self) -> int:
        """RabbitMQ's default, port + 20000, is invalid above 45535: take it when valid and free, else any free port."""
        candidates = [self.port + 20000] if self.port + 20000 <= 65535 else []
        for candidate in candidates + [0]:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", candidate))
                except OSError:
                    continue
                return sock.getsockname()[1]
        raise ClusterError("no free port for the private broker's Erlang distribution")

    @property
    def nodename(self) -> str:
        return f"splitinfer{self.port}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@localhost:{self.port}/"

    def env(self) -> dict[str, str]:
        d = self.data_dir
        env_file = d / "rabbitmq-env.conf"  # empty: keep /etc/rabbitmq/rabbitmq-env.conf (NODENAME=...) out of it
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(env_file),
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "HOME": str(d),  # its own Erlang cookie
        }

    def start(self, timeout: float = 90.0) -> str:
        server = _rabbit_bin("rabbitmq-server")
        if server is None:
            raise ClusterError("no broker answers and rabbitmq-server is not installed")
        d = self.data_dir
        for sub in ("mnesia", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RABBITMQ_CONF, d / "rabbitmq.conf")
        (d / "enabled_plugins").write_text(f"[{HASH_PLUGIN}].\n")
        (d / "rabbitmq-env.conf").write_text("")
        cookie = d / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(os.urandom(16).hex().upper())
            cookie.chmod(0o400)
        if broker_answers(self.url, timeout=2):
            self.say(f"reusing the private broker already running at {self.url} (node {self.nodename})")
            return self.url
        self.dist_port = self._pick_dist_port()
        self.say(f"no broker answers: starting a private RabbitMQ node {self.nodename} on port {self.port} "
                 f"(data in {d}, config {RABBITMQ_CONF})")
        log = open(d / "log" / "server.out", "ab")
        self.proc = subprocess.Popen([server], env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=d)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ClusterError(f"private broker exited with code {self.proc.returncode}; see {d / 'log'}")
            if broker_answers(self.url, timeout=2):
                self.say(f"private broker ready at {self.url}; other commands reach it with "
                         f"SPLITINFER_BROKER_URL={self.url}")
                return self.url
            time.sleep(0.5)
        self.stop()
        raise ClusterError(f"private broker did not answer within {timeout:.0f}s; see {d / 'log'}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        ctl = _rabbit_bin("rabbitmqctl")
        if ctl:
            with contextlib.suppress(Exception):
                subprocess.run([ctl, "-n", self.nodename, "stop"], env=self.env(), capture_output=True, timeout=timeout)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.say(f"private broker {self.nodename} stopped")


def ensure_broker(url: str, private_port: int, data_dir: Path, say: Callable[[str], None] = print,
                  allow_private: bool = True) -> tuple[str, PrivateBroker | None]:
    """The URL of a broker that answers and has the consistent-hash exchange, and the private broker if we started
    one (the caller stops it)."""
    if broker_answers(url):
        if not has_hash_exchange(url):
            if not _is_local(url):
                raise ClusterError(f"the broker at {_safe(url)} lacks the x-consistent-hash exchange; "
                                   f"enable it there: rabbitmq-plugins enable {HASH_PLUGIN}")
            say(f"enabling {HASH_PLUGIN} on the local broker")
            enable_hash_plugin_on_local_broker()
            if not has_hash_exchange(url):
                raise ClusterError(f"{HASH_PLUGIN} still unavailable at {_safe(url)} after enabling it")
        return url, None
    if not allow_private:
        raise ClusterError(f"no broker answers at {_safe(url)}")
    if not rabbitmq_installed():
        raise ClusterError(f"no broker answers at {_safe(url)} and rabbitmq-server is not installed")
    broker = PrivateBroker(private_port, Path(data_dir), say=say)
    return broker.start(), broker


def _safe(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{host}{port}", parts.path, "", ""))


# --------------------------------------------------------------------------------------------------- the actors

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

    def __init__(self, config: ClusterConfig, settings=None, run_dir: Path | None = None,
                 say: Callable[[str], None] = print, allow_private_broker: bool = True,
                 extra_env: dict[str, str] | None = None):
        from splitinfer.settings import get_settings

        self.config = config
        self.settings = settings or get_settings()
        self.namespace = config.namespace or self.settings.namespace
        self.broker_url = config.broker_url or self.settings.broker_url
        self.run_dir = Path(run_dir or self.settings.cache_dir / "run" / self.namespace)
        self.say = say
        self.allow_private_broker = allow_private_broker
        self.extra_env = dict(extra_env or {})
        self.private_broker: PrivateBroker | None = None
        self.actors: dict[str, ActorProcess] = {}
        self._watchers: list[asyncio.Task] = []
        self._stopping = False
        self._stopped = asyncio.Event()
        self._client = None

    # -- lifecycle
    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        self.broker_url, self.private_broker = await asyncio.to_thread(
            ensure_broker, self.broker_url, self.config.private_broker_port,
            self.settings.cache_dir / "broker" / str(self.config.private_broker_port), self.say,
            self.allow_private_broker,
        )
        env = {
            **os.environ,
            **self.extra_env,
            **self.config.link_env(),
            "SPLITINFER_NAMESPACE": self.namespace,
            "SPLITINFER_BROKER_URL": self.broker_url,
            "PYTHONUNBUFFERED": "1",
        }
        for name, argv in plan_actors(self.config):
            actor = ActorProcess(name, argv, env, self.run_dir / "logs" / f"{name.replace(':', '-')}.log")
            self.actors[name] = actor
            await self._spawn(actor)
            self._watchers.append(asyncio.create_task(self._watch(actor), name=f"watch {name}"))
        self.say(f"cluster {self.namespace!r} up: {len(self.actors)} actor processes, broker {_safe(self.broker_url)},"
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
            # a model server comes back empty: remember what it served, to order it back after the restart
            parts = await self._recall_parts(actor)
            up_for = time.monotonic() - actor.started_at
            actor.quick_crashes = 0 if up_for >= HEALTHY_AFTER_S else actor.quick_crashes + 1
            if actor.quick_crashes > MAX_RESTARTS:
                actor.gave_up = True
                self.say(f"{actor.name} crashed {actor.quick_crashes} times in a row (last exit {code}); "
                         f"giving up on it, see {actor.log_path}")
                return
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, actor.quick_crashes - 1))
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
            if parts:
                self._watchers.append(asyncio.create_task(self._restore_parts(actor, parts),
                                                          name=f"restore {actor.name}"))

    # -- a restarted model server gets its parts back
    async def _control_client(self):
        """A broker client of the supervisor's own (kind "client"), started on first use, stopped with the cluster."""
        if self._client is None:
            from splitinfer.actors.client import Client

            client = Client(self.settings.model_copy(update={"namespace": self.namespace,
                                                             "broker_url": self.broker_url}),
                            client_id=f"supervisor-{os.getpid()}")
            await client.start()
            self._client = client
        return self._client

    async def _recall_parts(self, actor: ActorProcess) -> list:
        """The parts a crashed model server hosted, from the registry (which still lists it for a while)."""
        if not actor.name.startswith("server:"):
            return []
        server_id = actor.name.split(":", 1)[1]
        try:
            client = await self._control_client()
            infos = await asyncio.wait_for(client.actors(include_dead=True), 10)
        except Exception as exc:
            self.say(f"{actor.name}: cannot ask the registry what it hosted ({type(exc).__name__}: {exc}); "
                     f"it restarts empty")
            return []
        return next((list(a.parts) for a in infos if a.actor_id == server_id), [])

    async def _restore_parts(self, actor: ActorProcess, parts: list) -> None:
        """Order the restarted server to load its parts again. The order waits in the server's durable control
        queue until the new process consumes it, so no need to wait for its registration first."""
        from splitinfer.messages import LoadPart, Reply

        server_id = actor.name.split(":", 1)[1]
        try:
            client = await self._control_client()
            answers = await asyncio.gather(*(
                client.rpc(client.names.load_key(server_id),
                           LoadPart(server_id=server_id, deployment=p.deployment, part=p.part, replica=p.replica,
                                    replicas=p.replicas), timeout=300)
                for p in parts), return_exceptions=True)
        except Exception as exc:
            answers = [exc]
        failed = [a for a in answers if not (isinstance(a, Reply) and a.ok)]
        if failed:
            why = failed[0].message if isinstance(failed[0], Reply) else f"{type(failed[0]).__name__}: {failed[0]}"
            self.say(f"{actor.name}: {len(failed)} of {len(parts)} part(s) not reloaded after the restart: {why}")
        else:
            self.say(f"{actor.name}: reloaded {', '.join(f'{p.part}@r{p.replica}/{p.replicas}' for p in parts)} "
                     f"after the restart")

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
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.stop()
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
    import argparse

    parser = argparse.ArgumentParser(prog="python -m splitinfer.actors.supervisor")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--servers", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        config = ClusterConfig.load(args.config) if args.config else ClusterConfig.default(args.servers or 1)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)

    async def run() -> None:
        sup = Supervisor(config, say=lambda m: print(m, flush=True))
        try:
            await sup.start()
        except ClusterError as exc:
            await sup.stop()
            raise SystemExit(f"error: {exc}")
        await sup.run_until_stopped()

    asyncio.run(run())


if __name__ == "__main__":
    main()
