"""Broker users per role, for a namespace: what each may configure, write and read (RabbitMQ's permission
regexes, and topic permissions on the control and results exchanges), and creating them with `rabbitmqctl` on
the broker host (`splitinfer broker-users`).

- control: everything of the namespace (the control plane, and an operator who deploys);
- server: its part queues and exchanges, its own control and link queues, publishing tensors, results, control
  messages and dead letters; it cannot declare, delete or read the control plane's queues;
- client: publishing inputs and jobs (through `<ns>.submit`, not the default exchange, which reaches every queue
  by name), the read-only services on `<ns>.control` (registry, pool, state queries: no load or unload orders, no
  link changes, no uploads or deletions, no deploys), and binding its queues only to answers whose key starts with
  its user name (the Client's id does), so it cannot read other clients' results.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass

from splitinfer.actors.supervisor.broker import BrokerError, _rabbit_bin
from splitinfer.actors.transport.topology import INTERNAL_REPLY_PREFIX, Names, escape_key

ROLES = ("control", "server", "client")
USER_PATTERN = r"[A-Za-z0-9_-]{1,48}"
CLIENT_CONTROL_KEYS = (Names.REGISTRY_QUERY, Names.POOL_REQUEST, Names.STATE_QUERY)  # queries, never orders


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str
    topics: dict[str, tuple[str, str]]  # exchange -> (write regex, read regex) on routing keys


def _any(*alternatives: str) -> str:
    return "^(" + "|".join(alternatives) + ")$"


def role_permissions(ns: str, role: str) -> Permissions:
    n = Names(ns)
    e = re.escape
    own = (r"amq\.gen-.*", "amq_.*")  # server-named and aio-pika-named queues (RPC replies, listeners)
    if role == "control":
        everything = _any(e(ns) + r"\..*", r"splitinfer\.probe\..*", r"amq\.default", *own)
        return Permissions(everything, everything, everything, {})
    if role == "server":
        mine = (e(ns) + r"\.(part|server|links|supervisor\.server)\..*",)
        core = e(ns) + r"\.(tensors|results|control|dead|submit)"
        return Permissions(configure=_any(*mine, *own), write=_any(core, *mine, r"amq\.default", *own),
                           read=_any(e(ns) + r"\.(tensors|control)", *mine, *own), topics={})
    if role == "client":
        mine = (e(ns) + r"\.client\..*",)
        return Permissions(
            configure=_any(*mine, *own),
            write=_any(e(ns) + r"\.(tensors|control|submit)", *mine, *own),
            read=_any(e(ns) + r"\.(results|control)", *mine, *own),
            topics={n.control: (_any(*(e(k) for k in CLIENT_CONTROL_KEYS)), r"^(heartbeat|deregister|plans)\..*"),
                    # its answers, and the front end's notices about its jobs (on the internal prefix)
                    n.results: ("^$", "^(" + e(escape_key(INTERNAL_REPLY_PREFIX)) + ")?{username}-.*")})
    raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")


def user_name(prefix: str, role: str) -> str:
    return f"{prefix}-{role}"


def _ctl(node: str | None, *args: str) -> str:
    tool = shutil.which("rabbitmqctl") or _rabbit_bin("rabbitmqctl")  # the system's wrapper knows its cookie
    if tool is None:
        raise BrokerError("rabbitmqctl is not installed here: run `splitinfer broker-users` on the broker host")
    proc = subprocess.run([tool, *(["-n", node] if node else []), *args], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        first = (proc.stderr or proc.stdout).strip().splitlines()[:1]
        raise BrokerError(f"rabbitmqctl {args[0]} failed: {first[0] if first else proc.returncode}")
    return proc.stdout


def create_users(ns: str, prefix: str, roles: tuple[str, ...] = ROLES, vhost: str = "/",
                 node: str | None = None) -> dict[str, tuple[str, str]]:
    """Create (or reset) one user per role with a fresh password and its permissions; {role: (user, password)}."""
    if not re.fullmatch(USER_PATTERN, prefix):
        raise BrokerError(f"user prefix {prefix!r}: letters, digits, '-' and '_' only (at most 48)")
    existing = set(_ctl(node, "-q", "list_users", "--no-table-headers").split())
    made = {}
    for role in roles:
        # hex: a password starting with '-' would read as an option to rabbitmqctl
        user, password = user_name(prefix, role), secrets.token_hex(16)
        perms = role_permissions(ns, role)
        if user in existing:
            _ctl(node, "change_password", user, password)
        else:
            _ctl(node, "add_user", user, password)
        _ctl(node, "set_permissions", "-p", vhost, user, perms.configure, perms.write, perms.read)
        _ctl(node, "clear_topic_permissions", "-p", vhost, user)
        for exchange, (write, read) in perms.topics.items():
            _ctl(node, "set_topic_permissions", "-p", vhost, user, exchange, write, read)
        made[role] = (user, password)
    return made


def delete_users(prefix: str, roles: tuple[str, ...] = ROLES, node: str | None = None) -> list[str]:
    existing = set(_ctl(node, "-q", "list_users", "--no-table-headers").split())
    gone = []
    for role in roles:
        user = user_name(prefix, role)
        if user in existing:
            _ctl(node, "delete_user", user)
            gone.append(user)
    return gone
