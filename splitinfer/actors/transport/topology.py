"""Every exchange, queue and routing key of a namespace, and the helpers that declare them.

Names (ns = settings.namespace):
- `<ns>.tensors`   topic exchange, a tensor published once with key `<deployment>.<tensor>` (both escaped)
- `<ns>.part.<dep>.<part>`       (segments through `name_segment`) x-consistent-hash exchange (hash-header request_id), bound to `<ns>.tensors`
                                 with each input key of the part (exchange-to-exchange)
- `<ns>.part.<dep>.<part>.r<k>`  replica k's queue, bound to the part exchange with weight "1",
                                 x-single-active-consumer, dead-lettered to `<ns>.dead`
- `<ns>.inflight`  the front end's queue of job notices: a caller that sends a job's inputs to the parts itself
                   (the Client) tells the front end there (a small frame, no tensors), so it tracks the job's
                   deadline off the tensor path
- `<ns>.results`   topic exchange, final results/errors, key = job id / reply_to
- `<ns>.jobs`      queue of InferenceJobs
- `<ns>.control`   topic exchange: `register.<actor>`, `heartbeat.<actor>`, `deregister.<actor>`, `load.<server>`,
                   `unload.<server>`, `registry.query`, `pool.request`, `pool.upload`, `error.<actor>`,
                   `optimizer.deploy`, `optimizer.undeploy`, `plans.<model>`
- `<ns>.dead`      fanout exchange + queue: every work queue's x-dead-letter-exchange
- `<ns>.registry`, `<ns>.pool`   the registry's and the model pool's control queues

Tensor names contain ':' '/' '@' and may contain '.', which is the topic separator: every key segment goes through
`escape_key` ('%' -> %25, '.' -> %2E, '*' -> %2A, '#' -> %23), so a key always has exactly two segments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Iterable

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from splitinfer.actors.transport.log import first_line
from splitinfer.actors.transport.nodes import broker_urls, connect_once, is_local_url

HASH_EXCHANGE_TYPE = "x-consistent-hash"
# reply_to of the tensors a front end sends: errors about them come back to it, not to the user; the front end
# also tells a Client on `<prefix><client id>` that a job's inputs were lost. Notices, not answers: the result
# store and subscribe_results skip what is published with this prefix
INTERNAL_REPLY_PREFIX = "~fe:"


_ESCAPES = (("%", "%25"), (".", "%2E"), ("*", "%2A"), ("#", "%23"))


def escape_key(segment: str) -> str:
    """One topic-key segment: no '.', '*', '#' left (reversible with unescape_key)."""
    for raw, esc in _ESCAPES:
        segment = segment.replace(raw, esc)
    return segment


def internal_reply_to(actor_id: str) -> str:
    """The reply_to of notices for one actor: a front end's errors about its tensors, a Client's lost inputs."""
    return f"{INTERNAL_REPLY_PREFIX}{actor_id}"


def is_internal_key(routing_key: str | None) -> bool:
    """Whether a routing key on `<ns>.results` carries a notice between actors rather than an answer."""
    return (routing_key or "").startswith(escape_key(INTERNAL_REPLY_PREFIX))


def name_segment(segment: str) -> str:
    """One segment of a queue or exchange name: AMQP allows only letters, digits, '-', '_', '.' and ':' there, so
    every other character, and '.' and ':' themselves (segments stay unambiguous), becomes ':<hex of its UTF-8>'."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "".join(f":{b:02x}" for b in c.encode())
                   for c in segment)


def unescape_key(segment: str) -> str:
    for raw, esc in reversed(_ESCAPES):
        segment = segment.replace(esc, raw)
    return segment


@dataclass(frozen=True)
class Names:
    """All names of one namespace."""

    ns: str

    @property
    def tensors(self) -> str:
        return f"{self.ns}.tensors"

    @property
    def results(self) -> str:
        return f"{self.ns}.results"

    @property
    def inflight(self) -> str:
        return f"{self.ns}.inflight"

    @property
    def jobs(self) -> str:
        return f"{self.ns}.jobs"

    @property
    def index(self) -> str:
        """A queue of the names the namespace's actors declared beyond the core (part exchanges and queues, server
        control queues): what `splitinfer down` deletes where no `rabbitmqctl` can list the broker."""
        return f"{self.ns}.index"

    @property
    def submit(self) -> str:
        """Where submitters put jobs and job notices (direct, keys: the queue names): a client needs no write
        permission on the default exchange, which reaches every queue by name."""
        return f"{self.ns}.submit"

    @property
    def control(self) -> str:
        return f"{self.ns}.control"

    @property
    def dead(self) -> str:
        return f"{self.ns}.dead"

    @property
    def registry_queue(self) -> str:
        return f"{self.ns}.registry"

    @property
    def pool_queue(self) -> str:
        return f"{self.ns}.pool"

    def tensor_key(self, deployment: str, tensor: str) -> str:
        return f"{escape_key(deployment)}.{escape_key(tensor)}"

    @staticmethod
    def result_key(job_or_reply_to: str) -> str:
        """Routing key on `<ns>.results` for a job id / reply_to (escaped: one segment)."""
        return escape_key(job_or_reply_to)

    def part_exchange(self, deployment: str, part: str) -> str:
        return f"{self.ns}.part.{name_segment(deployment)}.{name_segment(part)}"

    def replica_queue(self, deployment: str, part: str, replica: int) -> str:
        return f"{self.part_exchange(deployment, part)}.r{replica}"

    # control-plane routing keys
    @staticmethod
    def register_key(actor_id: str) -> str:
        return f"register.{escape_key(actor_id)}"

    @staticmethod
    def heartbeat_key(actor_id: str) -> str:
        return f"heartbeat.{escape_key(actor_id)}"

    @staticmethod
    def deregister_key(actor_id: str) -> str:
        return f"deregister.{escape_key(actor_id)}"

    @staticmethod
    def load_key(server_id: str) -> str:
        return f"load.{escape_key(server_id)}"

    @staticmethod
    def unload_key(server_id: str) -> str:
        return f"unload.{escape_key(server_id)}"

    @staticmethod
    def error_key(actor_id: str) -> str:
        return f"error.{escape_key(actor_id)}"

    REGISTRY_QUERY = "registry.query"
    POOL_REQUEST = "pool.request"
    POOL_UPLOAD = "pool.upload"
    # sites, link emulation and monitors
    LINKS_SET = "links.set"            # SetLinks, followed by every actor that receives tensors
    LINK_STATE = "state.link"          # LinkReport from a network monitor to the state pool
    HOP_STATE = "state.hops"           # HopReport from a front end to the state pool
    STATE_QUERY = "state_pool.query"   # GetState -> ClusterState (RPC)
    # the optimizer: DeployModel / UndeployModel (RPC); plan tables pushed to front ends
    OPTIMIZER_DEPLOY = "optimizer.deploy"
    OPTIMIZER_UNDEPLOY = "optimizer.undeploy"

    @staticmethod
    def plans_key(model: str) -> str:
        return f"plans.{escape_key(model)}"

    @property
    def optimizer_queue(self) -> str:
        return f"{self.ns}.optimizer"

    @staticmethod
    def probe_key(actor_id: str) -> str:
        return f"probe.{escape_key(actor_id)}"

    @property
    def state_pool_queue(self) -> str:
        return f"{self.ns}.state_pool"

    @property
    def result_store_queue(self) -> str:
        return f"{self.ns}.result_store"

    @property
    def supervisor_lock(self) -> str:
        """Held (an exclusive queue) by the supervisor running the namespace's one control plane."""
        return f"{self.ns}.supervisor"

    def server_lock(self, server_id: str) -> str:
        """Held by the supervisor running the server of that id (on whichever machine): ids stay unique."""
        return f"{self.ns}.supervisor.server.{escape_key(server_id)}"


MAX_ROUTING_KEY_BYTES = 255  # AMQP shortstr: a longer routing key cannot be published at all


def key_problem(value: str, what: str) -> str | None:
    """Why `value` (a job id, a reply_to) cannot become a routing key on `<ns>.results`, or None when it can: an
    answer that cannot be published would loop the job forever, so such ids are refused at admission."""
    if not isinstance(value, str) or not value:
        return f"{what} is empty"
    size = len(escape_key(value).encode())
    if size > MAX_ROUTING_KEY_BYTES:
        return (f"{what} is {size} bytes as a routing key (its '.', '*', '#', '%' escaped), at most "
                f"{MAX_ROUTING_KEY_BYTES} route")
    return None


DEAD_HEADER_PREFIX = "x-splitinfer-"
# header of an answer that is not new: a kept answer sent again to a resubmission, or a refusal for lack of time
# (the same id may be tried again): the front end does not remember it, the result store does not store it (a repeat
# was stored when it first went out)
UNKEPT = "x-splitinfer-unkept"


def dead_letter_headers(message, code: str, reason: str, actor_id: str) -> dict:
    """What a dead letter says about itself: why, who put it there, when, and where it was going (exchange and
    routing key: `splitinfer dead --requeue` sends it back there)."""
    return {f"{DEAD_HEADER_PREFIX}code": code, f"{DEAD_HEADER_PREFIX}reason": reason[:1000],
            f"{DEAD_HEADER_PREFIX}actor": actor_id, f"{DEAD_HEADER_PREFIX}time": time.time(),
            f"{DEAD_HEADER_PREFIX}exchange": message.exchange or "",
            f"{DEAD_HEADER_PREFIX}routing-key": message.routing_key or ""}


@dataclass(frozen=True)
class QueuePolicy:
    """How a namespace's queues are declared: the type of the queues that hold work the broker must keep (jobs,
    notices, control services, results, dead letters), their expiry (scratch namespaces) and the dead-letter
    queue's bounds. Part queues are always classic: their tensors are ephemeral (recomputed from the job, never the
    only copy) and latency matters most there. On a cluster (several node URLs) they are also transient: a
    durable classic queue whose node is down cannot be declared again anywhere, a transient one is deleted with
    its node and declared again by its server on a survivor."""

    queue_type: str = "classic"
    expires_s: float | None = None
    dead_max: int = 10_000
    dead_max_bytes: int = 256 * 1024 * 1024
    dead_ttl_s: float = 7 * 86400.0
    cluster: bool = False   # the broker URL lists several nodes

    @classmethod
    def from_settings(cls, settings) -> "QueuePolicy":
        return cls(queue_type=settings.queue_type, expires_s=settings.queue_expires_s,
                   dead_max=settings.dead_letter_max, dead_max_bytes=int(settings.dead_letter_max_mb * 1024 * 1024),
                   dead_ttl_s=settings.dead_letter_ttl_s, cluster=len(broker_urls(settings.broker_url)) > 1)

    def arguments(self, names: Names, *, single_active: bool = False, dead_letter: bool = True,
                  kept: bool = True) -> dict:
        """x-arguments of a durable queue; `kept`: one holding work the broker must keep (takes `queue_type`)."""
        args: dict = {}
        if dead_letter:
            args["x-dead-letter-exchange"] = names.dead
        if single_active:
            args["x-single-active-consumer"] = True
        if self.expires_s:
            args["x-expires"] = int(self.expires_s * 1000)
        if kept and self.queue_type == "quorum":
            args["x-queue-type"] = "quorum"
        return args

    @property
    def durable_parts(self) -> bool:
        """Part queues outlive a broker restart on one node (keeping their bindings while the servers reconnect);
        on a cluster they must not outlive their node."""
        return not self.cluster

    def dead_arguments(self, names: Names) -> dict:
        """The dead-letter queue: bounded in count, bytes and age; the oldest go first."""
        return {**self.arguments(names, dead_letter=False), "x-max-length": self.dead_max,
                "x-max-length-bytes": self.dead_max_bytes, "x-message-ttl": int(self.dead_ttl_s * 1000),
                "x-overflow": "drop-head"}


class TopologyMismatch(Exception):
    """The namespace's queues exist with other arguments (another version or other settings declared them)."""


async def declare_kept_queue(channel: AbstractChannel, names: Names, name: str, policy: QueuePolicy,
                             arguments: dict | None = None, durable: bool = True) -> AbstractQueue:
    """A queue declared as the policy says (durable unless told: one holding work the broker must keep)."""
    args = arguments if arguments is not None else policy.arguments(names)
    try:
        return await channel.declare_queue(name, durable=durable, arguments=args)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyMismatch(
            f"queue {name} exists with other arguments ({first_line(exc)}): the namespace was set up with other "
            f"settings (SPLITINFER_QUEUE_TYPE, SPLITINFER_DEAD_LETTER_*); use the same ones, or remove its queues "
            f"with `splitinfer down --purge`, or use another SPLITINFER_NAMESPACE") from None


async def declare_core(channel: AbstractChannel, names: Names, policy: QueuePolicy) -> dict[str, AbstractExchange]:
    """The namespace's exchanges, the dead-letter queue and the jobs queue (idempotent)."""
    ex = {
        "tensors": await channel.declare_exchange(names.tensors, aio_pika.ExchangeType.TOPIC, durable=True),
        "results": await channel.declare_exchange(names.results, aio_pika.ExchangeType.TOPIC, durable=True),
        "control": await channel.declare_exchange(names.control, aio_pika.ExchangeType.TOPIC, durable=True),
        "dead": await channel.declare_exchange(names.dead, aio_pika.ExchangeType.FANOUT, durable=True),
        "submit": await channel.declare_exchange(names.submit, aio_pika.ExchangeType.DIRECT, durable=True),
    }
    dlq = await declare_kept_queue(channel, names, names.dead, policy, policy.dead_arguments(names))
    await dlq.bind(ex["dead"], routing_key="")
    jobs = await declare_kept_queue(channel, names, names.jobs, policy)
    await jobs.bind(ex["submit"], routing_key=names.jobs)
    # kept as the work queues are (quorum on a cluster): a durable classic queue on a lost node blocks every
    # declaration of it, and so every actor's reconnection
    await declare_kept_queue(channel, names, names.index, policy, {
        **policy.arguments(names, dead_letter=False), "x-max-length": INDEX_MAX, "x-overflow": "drop-head"})
    return ex


INDEX_MAX = 10_000  # entries the names index keeps (the oldest go first: their queues expire by themselves)


async def record_names(channel: AbstractChannel, names: Names, *, queues: Iterable[str] = (),
                       exchanges: Iterable[str] = ()) -> None:
    """Add declared names to the namespace's index (through the default exchange: no permission on the index
    itself is needed). Best effort: a lost entry only leaves a name for the broker's own expiry."""
    body = json.dumps({"queues": list(queues), "exchanges": list(exchanges)}).encode()
    with contextlib.suppress(Exception):
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=names.index)


async def _indexed_names(conn, names: Names) -> dict[str, set[str]]:
    """Every name in the namespace's index (read to the end; the index is deleted with the namespace)."""
    found: dict[str, set[str]] = {"queues": set(), "exchanges": set()}
    channel = await conn.channel()
    try:
        queue = await channel.declare_queue(names.index, passive=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                entry = json.loads(message.body)
                for kind in found:
                    found[kind].update(n for n in entry.get(kind, []) if isinstance(n, str)
                                       and n.startswith(names.ns + "."))
    except Exception:
        pass
    return found


CORE_EXCHANGES = ("tensors", "results", "control", "dead", "submit")


async def find_core(channel: AbstractChannel, names: Names) -> dict[str, AbstractExchange]:
    """The namespace's exchanges, declared passively: for a user allowed to use them but not to declare them (a
    client's or a server's broker user); NOT_FOUND when the namespace has not been set up."""
    return {short: await channel.get_exchange(getattr(names, short), ensure=True) for short in CORE_EXCHANGES}


async def declare_part(channel: AbstractChannel, names: Names, deployment: str, part: str,
                       input_tensors: Iterable[str], replicas: int, policy: QueuePolicy) -> list[AbstractQueue]:
    """The part's consistent-hash exchange bound to its input keys, and one SAC queue per replica (idempotent).

    Every server hosting a replica of the part declares all `replicas` queues, so the hash ring is the same
    whoever comes first; all servers of a part must agree on `replicas`."""
    tensors = await channel.get_exchange(names.tensors, ensure=False)
    part_ex = await channel.declare_exchange(
        names.part_exchange(deployment, part), HASH_EXCHANGE_TYPE, durable=True,
        arguments={"hash-header": "request_id"})
    for t in input_tensors:
        await part_ex.bind(tensors, routing_key=names.tensor_key(deployment, t))
    queues = []
    for k in range(replicas):
        q = await declare_kept_queue(channel, names, names.replica_queue(deployment, part, k), policy,
                                     policy.arguments(names, single_active=True, kept=False),
                                     durable=policy.durable_parts)
        await q.bind(part_ex, routing_key="1")
        queues.append(q)
    await record_names(channel, names, queues=[q.name for q in queues], exchanges=[part_ex.name])
    return queues


async def declare_control_queue(channel: AbstractChannel, names: Names, queue: str, keys: Iterable[str],
                                policy: QueuePolicy) -> AbstractQueue:
    """A shared (non-exclusive) queue bound to `<ns>.control` with keys; dead-lettered like every work queue."""
    control = await channel.get_exchange(names.control, ensure=False)
    q = await declare_kept_queue(channel, names, queue, policy)
    for key in keys:
        await q.bind(control, routing_key=key)
    await record_names(channel, names, queues=[queue])
    return q


async def delete_namespace_part(channel: AbstractChannel, names: Names, deployment: str, part: str,
                                replicas: int) -> None:
    """Remove a part's queues and exchange (used by undeploy/cleanup)."""
    for k in range(replicas):
        await channel.queue_delete(names.replica_queue(deployment, part, k))
    await channel.exchange_delete(names.part_exchange(deployment, part))


def _local_broker_names(prefix: str) -> dict[str, list[str]] | None:
    """Exchanges and queues whose name starts with `prefix.`, listed by the local rabbitmqctl (None: no listing;
    AMQP itself cannot list)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    names: dict[str, list[str]] = {}
    for kind in ("exchanges", "queues"):
        try:
            out = subprocess.run(["rabbitmqctl", "-q", f"list_{kind}", "name"], capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode != 0:
            return None
        names[kind] = [n.strip() for n in out.stdout.splitlines() if n.strip().startswith(prefix + ".")]
    return names


def known_names(names: Names) -> dict[str, list[str]]:
    """The names a namespace always has (when no listing of the broker is at hand): core and control plane."""
    return {"queues": [names.jobs, names.inflight, names.dead, names.registry_queue, names.pool_queue,
                       names.optimizer_queue, names.state_pool_queue, names.result_store_queue, names.index],
            "exchanges": [names.tensors, names.results, names.control, names.dead, names.submit]}


async def holds_lock(channel: AbstractChannel, queue: str) -> bool:
    """Whether someone holds the exclusive lock queue (a supervisor of the namespace's control plane or a
    server); on a throwaway channel: a passive declare of a missing queue closes it."""
    try:
        await channel.declare_queue(queue, passive=True)
        return True
    except aiormq.exceptions.ChannelLockedResource:
        return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False


async def control_plane_runs(broker_url: str, prefix: str) -> bool:
    """Whether a `splitinfer up` runs the namespace, asked over a plain connection (nothing declared: `down` works
    whatever queue settings this machine has)."""
    conn = await connect_once(broker_url, timeout=10)
    async with conn:
        return await holds_lock(await conn.channel(), Names(prefix).supervisor_lock)


async def delete_namespace(broker_url: str, prefix: str, *, keep_nonempty: bool = False
                           ) -> tuple[int, list[str]]:
    """Delete every exchange and queue of a namespace (`splitinfer down`, a test run, a benchmark, the demo):
    queues expire by themselves, exchanges never do. What to delete: the names every namespace has, the ones its
    actors recorded in its index (through the broker: from any machine), and, for a broker on this machine, what
    its rabbitmqctl lists. `keep_nonempty`: a queue still holding messages (jobs, dead letters) stays. Returns
    (how many were deleted, the queues kept). Never raises: cleanup must not fail the run it follows."""
    ns = Names(prefix)
    found = {kind: set(v) for kind, v in known_names(ns).items()}
    if all(is_local_url(u) for u in broker_urls(broker_url)):
        listed = await asyncio.to_thread(_local_broker_names, prefix)
        for kind, more in (listed or {}).items():
            found[kind].update(more)
    deleted, kept = 0, []
    with contextlib.suppress(Exception):
        conn = await connect_once(broker_url, timeout=10)
        async with conn:
            for kind, more in (await _indexed_names(conn, ns)).items():
                found[kind].update(more)
            # the index last: a failure half-way leaves it to find the rest next time
            names = {kind: sorted(found[kind] - {ns.index}) + ([ns.index] if ns.index in found[kind] else [])
                     for kind in found}
            for kind in ("queues", "exchanges"):
                for name in names[kind]:
                    channel = await conn.channel()  # a failed delete closes its channel
                    try:
                        if kind == "exchanges":
                            await channel.exchange_delete(name)
                        else:
                            await channel.queue_delete(name, if_empty=keep_nonempty)
                        deleted += 1
                    except aiormq.exceptions.ChannelPreconditionFailed:
                        kept.append(name)  # not empty
                    except Exception:
                        pass
    return deleted, kept
