"""The broker a cluster runs on: is there one, does it have the consistent-hash exchange, and, when none answers
and RabbitMQ is installed, a private node of our own (own node name, port, data directory, the project's
rabbitmq.conf, the plugin enabled) that the supervisor starts and stops."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import aiormq.exceptions

from splitinfer.actors import transport
from splitinfer.actors.transport import masked

REPO_ROOT = Path(__file__).resolve().parents[3]
RABBITMQ_CONF = REPO_ROOT / "rabbitmq.conf"
HASH_PLUGIN = "rabbitmq_consistent_hash_exchange"


class BrokerError(Exception):
    """A broker problem the user can fix (shown as one line by the CLI)."""


def broker_answers(url: str, timeout: float = 3.0) -> bool:
    """True if an AMQP broker accepts a connection at url (from synchronous code)."""
    return _run_coro(transport.broker_answers(url, timeout))


def has_hash_exchange(url: str) -> bool | None:
    """True if the broker knows the x-consistent-hash exchange type (plugin enabled); None if this broker user may
    not declare exchanges to find out (a server's or a client's: the control plane's user checked)."""

    async def probe() -> bool | None:
        conn = await transport.connect_once(url, timeout=5)
        try:
            ch = await conn.channel()
            name = f"splitinfer.probe.{os.getpid()}.{time.monotonic_ns()}"
            try:
                ex = await ch.declare_exchange(name, "x-consistent-hash", auto_delete=True,
                                               arguments={"hash-header": "request_id"})
            except aiormq.exceptions.ChannelAccessRefused:
                return None
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
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


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
        raise BrokerError(f"the broker lacks the x-consistent-hash exchange; run: rabbitmq-plugins enable {HASH_PLUGIN}")
    proc = subprocess.run([tool, "enable", HASH_PLUGIN], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        first = (proc.stderr or proc.stdout).strip().splitlines()[:1]
        raise BrokerError(f"rabbitmq-plugins enable {HASH_PLUGIN} failed: {first[0] if first else proc.returncode}")


@dataclass
class PrivateBroker:
    """A RabbitMQ node of our own: node name, port, data directory and config are private to it."""

    port: int
    data_dir: Path
    say: Callable[[str], None] = print
    proc: subprocess.Popen | None = None
    dist_port: int = 0  # Erlang distribution port (rabbitmqctl talks to the node on it); chosen free at start
    cookie: str | None = None  # the Erlang cookie; nodes of one cluster share it (None: a random one of its own)
    extra_conf: str = ""       # rabbitmq.conf lines of its own after the project's (a TLS listener, say)

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
        raise BrokerError("no free port for the private broker's Erlang distribution")

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
            raise BrokerError("no broker answers and rabbitmq-server is not installed")
        d = self.data_dir
        for sub in ("mnesia", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq.conf").write_text(RABBITMQ_CONF.read_text() + ("\n" + self.extra_conf if self.extra_conf else ""))
        (d / "enabled_plugins").write_text(f"[{HASH_PLUGIN}].\n")
        (d / "rabbitmq-env.conf").write_text("")
        cookie = d / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie or os.urandom(16).hex().upper())
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
                raise BrokerError(f"private broker exited with code {self.proc.returncode}; see {d / 'log'}")
            if broker_answers(self.url, timeout=2):
                self.say(f"private broker ready at {self.url}; other commands reach it with "
                         f"SPLITINFER_BROKER_URL={self.url}")
                return self.url
            time.sleep(0.5)
        self.stop()
        raise BrokerError(f"private broker did not answer within {timeout:.0f}s; see {d / 'log'}")

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

    def ctl(self, *args: str, timeout: float = 120.0) -> None:
        """rabbitmqctl against this node; BrokerError with its first line if it fails."""
        ctl = _rabbit_bin("rabbitmqctl")
        if ctl is None:
            raise BrokerError("rabbitmqctl is not installed")
        proc = subprocess.run([ctl, "-n", self.nodename, *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            first = (proc.stderr or proc.stdout).strip().splitlines()[:1]
            raise BrokerError(f"rabbitmqctl {' '.join(args)} on {self.nodename} failed: "
                              f"{first[0] if first else proc.returncode}")


@dataclass
class PrivateCluster:
    """Several private nodes on this machine joined into one RabbitMQ cluster (a shared cookie; each node its own
    name, port, data directory and the consistent-hash plugin): for the tests and benchmarks that stop a node."""

    ports: list[int]
    data_dir: Path
    say: Callable[[str], None] = print
    nodes: list[PrivateBroker] = field(default_factory=list)

    def __post_init__(self) -> None:
        cookie = os.urandom(16).hex().upper()
        self.nodes = [PrivateBroker(port, Path(self.data_dir) / f"node{port}", say=self.say, cookie=cookie)
                      for port in self.ports]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: what SPLITINFER_BROKER_URL takes for a cluster."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> str:
        first, *others = self.nodes
        try:
            first.start()
            for node in others:
                node.start()
                node.ctl("stop_app")
                node.ctl("join_cluster", first.nodename)
                node.ctl("start_app")
                if not broker_answers(node.url, timeout=30):
                    raise BrokerError(f"node {node.nodename} did not answer after joining the cluster")
        except BaseException:
            self.stop()
            raise
        self.say(f"private cluster of {len(self.nodes)} nodes ready at {masked(self.url)}")
        return self.url

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


def ensure_broker(url: str, private_port: int, data_dir: Path, say: Callable[[str], None] = print,
                  allow_private: bool = True) -> tuple[str, PrivateBroker | None]:
    """The URL of a broker that answers and has the consistent-hash exchange, and the private broker if we started
    one (the caller stops it)."""
    if broker_answers(url):
        if has_hash_exchange(url) is False:
            if not transport.is_local_url(url):
                raise BrokerError(f"the broker at {masked(url)} lacks the x-consistent-hash exchange; "
                                   f"enable it there: rabbitmq-plugins enable {HASH_PLUGIN}")
            say(f"enabling {HASH_PLUGIN} on the local broker")
            enable_hash_plugin_on_local_broker()
            if has_hash_exchange(url) is False:
                raise BrokerError(f"{HASH_PLUGIN} still unavailable at {masked(url)} after enabling it")
        return url, None
    if not allow_private:
        raise BrokerError(f"no broker answers at {masked(url)}; start RabbitMQ there, or ask for a private node on "
                          f"this machine (`splitinfer up --private-broker`, or private_broker = true in cluster.toml)")
    if not rabbitmq_installed():
        raise BrokerError(f"no broker answers at {masked(url)} and rabbitmq-server is not installed")
    broker = PrivateBroker(private_port, Path(data_dir), say=say)
    return broker.start(), broker
