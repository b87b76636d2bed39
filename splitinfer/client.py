"""The Python SDK: run inference on a deployed split model, deploy splits and models, read the cluster's state.

    async with Client(settings) as c:
        dep = await c.deploy("split_dir", replicas=1)           # upload to the pool, order servers to load parts
        result = await c.infer(dep.deployment, {"input_layer:0": x})   # ResultMessage: outputs, hops, latency
        result = await c.infer(dep.deployment, x)              # a single-input model takes the array alone
        table = await c.deploy_model("keras.applications:MobileNetV3Small", "mnv3s", objective="energy")
        result = await c.infer("mnv3s", x, max_latency_s=0.1, battery=0.2)  # the front end picks a plan
        result.plan                                            # which plan ran

A failed job raises `JobFailed` (its `.error` is the ErrorResult: code, message, where). A job's inputs go
straight to the deployment's first parts (the Client chooses a model deployment's plan from its pushed plan table)
and the answer comes straight back on `<ns>.results` with this client's id as routing key: parts + 1 broker hops
in all. The front end tracks the job's deadline from a notice off that path; the Client holds the inputs and
re-sends a job that brought nothing after a share of its deadline.

For users who wire their own: `publish_job(job)` puts an InferenceJob (or raw bytes) on the jobs queue, where the
front end validates it and sends its inputs (parts + 2 hops); `subscribe_results(key)` yields every ResultMessage /
ErrorResult published with that key ("#": all).

The Client is not an actor: it composes a transport session (connection, publisher, RPC) with the typed clients
of the services it talks to (registry, model pool, state pool, optimizer, model servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import aiormq.exceptions
import numpy as np
from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.front_end.tracker import Admission, JobTracker, PendingJob
from splitinfer.actors.front_end.watch import ServerWatch, route
from splitinfer.actors.model_pool.client import PoolClient, PoolError
from splitinfer.actors.model_server.client import ServerOrders, failures
from splitinfer.actors.optimizer.client import OptimizerClient
from splitinfer.actors.registry.client import RegistryClient
from splitinfer.actors.state_pool.client import StatePoolClient
from splitinfer.actors.transport import (
    Forbidden,
    Names,
    RemoteError,
    Session,
    Unroutable,
    broker_urls,
    connect_once,
)
from splitinfer.actors.transport import dead_letters as dlq
from splitinfer.actors.transport.connection import connect_failover
from splitinfer.actors.transport.dead_letters import DeadLetter
from splitinfer.actors.transport.retry import (
    CLIENT_DEADLINE_SLACK_S,
    DEADLINE_GRACE_S,
    LOST_INPUT_ERRORS,
    OUTAGE,
    classify,
)
from splitinfer.actors.transport.topology import holds_lock, internal_reply_to, is_internal_key, key_problem
from splitinfer.config import Settings, get_settings
from splitinfer.messages import (
    ActorInfo,
    ClusterState,
    DeployModel,
    Deregister,
    ErrorResult,
    Heartbeat,
    InferenceJob,
    LinkSpec,
    MessageError,
    PlanTableMessage,
    ModelVariant,
    Requirements,
    ResultMessage,
    SetLinks,
    decode,
    encode,
    plan_deployment_name,
)
from splitinfer.messages.frames import NOTICE, TENSORS, decode_frame, encode_frame, is_frame, result_message
from splitinfer.monitor.links import MBIT
from splitinfer.planner import PlanTable
from splitinfer.splitter.errors import SplitError
from splitinfer.splitter.manifest import APPLICATIONS_PREFIX, Manifest

ANSWER_SLACK_S = 10.0   # past the job's deadline the front end has answered; wait this much longer for the message
TICK_S = 0.25           # the client looks at its jobs' retries and deadlines at least this often
LISTING_TIMEOUT_S = 10.0
SEEN_ANSWERS = 10_000   # subscribe_results remembers this many job ids to drop a repeated answer


def client_prefix(broker_url: str) -> str:
    """The broker user of the URL (its first node's) when it can start a routing key as it is, else "client"."""
    user = urlsplit(broker_urls(broker_url)[0]).username or ""
    return user if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", user) else "client"


class ClientError(Exception):
    """Something the caller can fix: no servers, unknown part in a placement, pool refused the split..."""


class NotDeployed(ClientError):
    """No queue takes the deployment's inputs: it is not loaded (or, when its servers are alive, their queues are
    being declared again after a broker node went down)."""


class JobFailed(Exception):
    def __init__(self, error: ErrorResult):
        super().__init__(f"job {error.job_id}: {error.code}: {error.message}")
        self.error = error


@dataclass
class _Waiter:
    future: asyncio.Future
    dtypes: dict[str, str]   # the final outputs' dtypes (a compressed output is restored to them)
    sent_at: float           # loop time: the answer's latency is measured on this machine's clock
    deployment: str = ""     # set for a job submitted through `submit` (admission learns from its answer)


@dataclass
class Deployment:
    deployment: str
    placement: dict[str, list[str]]  # part -> server id per replica
    inputs: list[str]
    outputs: list[str]
    load_s: float = 0.0


class Client:
    def __init__(self, settings: Settings | None = None, client_id: str | None = None):
        # prefixed by the broker user: a client user (`splitinfer broker-users`) may read only answers keyed so
        self.settings = settings or get_settings()
        self.id = client_id or f"{client_prefix(self.settings.broker_url)}-{uuid.uuid4().hex[:10]}"
        self.session = Session(self.settings, f"client:{self.id}")
        self.names = self.session.names
        rpc = self.session.rpc
        self.registry = RegistryClient(rpc)
        self.pool = PoolClient(rpc, self.settings.pool_chunk_bytes)
        self.state_pool = StatePoolClient(rpc)
        self.optimizer = OptimizerClient(rpc)
        self.orders = ServerOrders(rpc, self.names)
        self._waiters: dict[str, _Waiter] = {}
        # this client's jobs: retries (it holds their inputs) and, when no front end answers it, the deadline
        self.jobs = JobTracker(grace_s=DEADLINE_GRACE_S + CLIENT_DEADLINE_SLACK_S)
        self._manifests: dict[str, Manifest] = {}
        self._tables: dict[str, PlanTable] = {}
        self.watch = ServerWatch(self.settings.liveness_timeout_s)
        self._front: str | None = None  # the front end that tracks our jobs
        self._site = ""                  # the client's site: the front end's
        self._front_clock_offset_s: float | None = None  # the front end's wall clock minus ours
        # overload: at most this many jobs in the cluster at once (more wait their turn, within their deadline),
        # and a job that cannot finish in time by what recent jobs took is answered at once, not sent
        self._slots = asyncio.Semaphore(self.settings.client_max_inflight)
        self._holding: set[str] = set()   # jobs holding a slot
        self._sending: set[str] = set()   # jobs whose send is under way (an outage hook leaves them alone)
        self.admission = Admission()

    async def __aenter__(self) -> "Client":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, or fail at once with one line when no broker answers (no minute of retries for a user)."""
        await self.session.open(fail_fast=True)
        channel = self.session.connection.channel
        exchanges = self.session.connection.exchanges
        q = await channel.declare_queue(f"{self.names.ns}.client.{self.names.result_key(self.id)}", exclusive=True,
                                        auto_delete=True)
        await q.bind(exchanges["results"], routing_key=self.names.result_key(self.id))
        # the front end's word that a job's inputs were lost on the way (it goes again at once)
        await q.bind(exchanges["results"], routing_key=self.names.result_key(internal_reply_to(self.id)))
        await q.consume(self._on_answer, no_ack=True)
        # what choosing a plan needs: who is down, the device's battery, plan tables
        watch = await channel.declare_queue(f"{self.names.ns}.client.{self.names.result_key(self.id)}.watch",
                                            exclusive=True, auto_delete=True)
        for key in ("heartbeat.*", "deregister.*", "plans.*"):
            await watch.bind(exchanges["control"], routing_key=key)
        await watch.consume(self._on_watch, no_ack=True)
        self.session.spawn(self._tick())
        self.session.connection.on_reconnect(self._resend_after_outage)

    async def stop(self) -> None:
        for w in self._waiters.values():
            if not w.future.done():
                w.future.set_exception(ClientError(f"client {self.id} stopped before the answer came"))
        self._waiters.clear()
        await self.session.close()

    async def _on_answer(self, message: AbstractIncomingMessage) -> None:
        """An answer: a result frame straight from the part that produced it, or an error (from the front end or
        a part). The first answer of a job wins; a duplicate (a recomputation after a crash) is dropped."""
        received = time.time()
        body = message.body
        try:
            if is_frame(body):
                frame = decode_frame(body, self.settings.max_message_bytes)
                waiter = self._waiters.get(frame.job_id)
                if waiter is None:
                    return
                hops = [*frame.hops, ["answer", self.id, max(0.0, received - frame.meta.get("sent", received)), 0.0,
                                      0.0, 0.0, 1, received, "broker"]]
                frame.meta["hops"] = hops
                answer = result_message(frame, waiter.dtypes, asyncio.get_running_loop().time() - waiter.sent_at)
            else:
                answer = decode(body, max_bytes=self.settings.max_message_bytes, expect=(ResultMessage, ErrorResult))
        except MessageError:
            return
        job_id = answer.job_id or ""
        if isinstance(answer, ErrorResult):  # a part's error names the request (one attempt), not the job
            mine = self.jobs.on_error(job_id, answer.code, answer.message)
            if mine is None and answer.code in LOST_INPUT_ERRORS:
                return  # its inputs were lost on the way: the job goes again now, or its deadline answers it
            job_id = mine.job.job_id if mine is not None else job_id
            if job_id != answer.job_id:
                answer = answer.model_copy(update={"job_id": job_id})
        else:
            self.jobs.on_answered(job_id)
        self._resolve(job_id, answer)

    def _resolve(self, job_id: str, answer: ResultMessage | ErrorResult) -> None:
        self.jobs.on_answered(job_id)
        if job_id in self._holding:
            self._holding.discard(job_id)
            self._slots.release()
        waiter = self._waiters.pop(job_id, None)
        if waiter is None:
            return
        if waiter.deployment:
            now = asyncio.get_running_loop().time()
            ok = isinstance(answer, ResultMessage)
            self.admission.done(waiter.deployment, now - waiter.sent_at if ok else None, now)
        if not waiter.future.done():
            waiter.future.set_result(answer)

    async def _on_watch(self, message: AbstractIncomingMessage) -> None:
        try:
            msg = decode(message.body, max_bytes=self.settings.max_message_bytes,
                         expect=(Heartbeat, Deregister, PlanTableMessage))
        except MessageError:
            return
        if isinstance(msg, Heartbeat):
            self.watch.heartbeat(msg.actor_id, msg.state, parts=msg.parts)
            if msg.kind == "front_end" and self._front is None:
                self._front, self._site = msg.actor_id, msg.site
            if msg.kind == "front_end" and msg.actor_id == self._front:
                # its clock against ours (to a heartbeat's trip through the broker): a job on the jobs queue is
                # stamped in the front end's time, so a wrong clock here can neither expire nor extend it
                self._front_clock_offset_s = msg.sent_at - time.time()
        elif isinstance(msg, Deregister):
            self.watch.deregister(msg.actor_id)
        elif msg.name in self._tables:
            if msg.removed or not msg.table:
                self._tables.pop(msg.name, None)
                self._manifests.pop(msg.name, None)
            else:
                self._tables[msg.name] = PlanTable.from_json(msg.table)

    async def _ask(self, coro, what: str):
        """A service's answer, or ClientError saying that it did not answer or what it refused."""
        try:
            return await coro
        except (asyncio.TimeoutError, Unroutable):
            raise ClientError(f"the {what} did not answer: is the cluster up (`splitinfer up`)?") from None
        except (RemoteError, PoolError, Forbidden) as exc:
            raise ClientError(str(exc)) from None

    # ------------------------------------------------------------------ inference
    async def submit(self, deployment: str, inputs: Mapping[str, np.ndarray] | np.ndarray, *,
                     deadline_s: float | None = None, job_id: str | None = None,
                     requirements: Requirements | None = None) -> asyncio.Future:
        """Send a job; the future resolves to its ResultMessage or ErrorResult. The inputs go straight to the
        deployment's first parts, the answer comes straight back from the part that produces it; the front end
        tracks the job's deadline from a notice, off that path, and this client re-sends a job that brought
        nothing after a share of its deadline. `requirements` (max latency, battery level, min fidelity) choose the
        plan of a model deployment (see deploy_model).

        The same job id submitted again while it runs gets the same future. While the broker is away (a restart)
        the job waits for it, within its deadline; after a reconnect every unanswered job is sent again at once."""
        if job_id is not None:
            problem = key_problem(job_id, "job id")
            if problem is not None:
                raise ClientError(f"bad_job_id: {problem}")
            if job_id in self._waiters:
                return self._waiters[job_id].future
        manifest = await self.manifest(deployment)
        if isinstance(inputs, np.ndarray):
            names = [t.name for t in manifest.inputs]
            if len(names) != 1:
                raise ClientError(f"deployment {deployment} takes {len(names)} inputs {names}: pass a dict")
            inputs = {names[0]: inputs}
        arrays = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        bad = manifest.check_inputs(arrays)
        if bad is not None:  # refused at once, with the code the front end would answer
            raise ClientError(f"{bad[0]}: deployment {deployment}: {bad[1]}")
        requirements = requirements or Requirements()
        to, plan, problem = route(deployment, self._tables.get(deployment), requirements, self.watch)
        if problem is not None:
            raise ClientError(f"{problem[0]}: {problem[1]}")
        job_id = job_id or uuid.uuid4().hex
        if self._front is None:
            await self._find_front_end()
        loop = asyncio.get_running_loop()
        deadline_s = deadline_s or self.settings.job_deadline_s
        submitted, deadline = loop.time(), loop.time() + deadline_s
        late = await self._take_slot(deployment, deadline)
        if late is not None:  # answered at once: it could not finish in time
            fut = loop.create_future()
            fut.set_result(ErrorResult(job_id=job_id, deployment=deployment, code="deadline_exceeded",
                                       message=f"job {job_id}: {late}", where=self.id))
            return fut
        self._holding.add(job_id)
        job = PendingJob(job_id=job_id, deployment=deployment, reply_to=self.id, inputs=arrays,
                         final_outputs=manifest.output_names, received_at=submitted, deadline=deadline,
                         attempt_timeout_s=max(0.05, deadline_s * self.jobs.retry_share), route=to, plan=plan,
                         requirements=requirements, error_to=self._error_to())
        if self.jobs.admit(job, loop.time()) is not None:
            self._holding.discard(job_id)
            self._slots.release()
            raise ClientError(f"job {job_id} was already submitted by this client")
        waiter = _Waiter(loop.create_future(), {t.name: t.dtype for t in manifest.outputs}, loop.time(), deployment)
        self._waiters[job_id] = waiter
        self.admission.sent(deployment)
        try:
            await self._send_through_outage(job)
        except BaseException as exc:
            self._resolve(job_id, ErrorResult(job_id=job_id, deployment=deployment, code="not_sent",
                                              message=str(exc), where=self.id))
            raise
        return waiter.future

    async def _take_slot(self, deployment: str, deadline: float) -> str | None:
        """Wait for one of the client's in-flight slots; why the job cannot finish in time instead, or None."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(self._slots.acquire(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return f"no room for it before its deadline ({self.settings.client_max_inflight} jobs in flight)"
        refusal = self.admission.refusal(deployment, deadline - loop.time(), loop.time())
        if refusal is not None:
            self._slots.release()
        return refusal

    async def _send_through_outage(self, job: PendingJob) -> None:
        """`_send`, riding out a broker that is away (the OUTAGE backoff, never past the job's deadline): the job
        then stays unsent, and its deadline answers it."""
        loop = asyncio.get_running_loop()
        self._sending.add(job.job_id)
        try:
            for failures in range(1, OUTAGE.attempts + 1):
                try:
                    await self._send(job)
                    return
                except NotDeployed as exc:
                    if self.watch.hosted(job.route) is not True:
                        raise
                    error = exc  # its servers are alive: their queues are coming back (a broker node lost them)
                except ClientError:
                    raise
                except Exception as exc:
                    # a nack or a lost channel while a broker node goes down is worth waiting out; anything else,
                    # with the connection up, is not
                    if self.session.connection.is_open and failures >= 2 and classify(exc) != "transient":
                        raise ClientError(f"could not send job {job.job_id}: {exc}") from None
                    error = exc
                wait = OUTAGE.delay(failures)
                if loop.time() + wait >= job.deadline:
                    self.session.log.warning("job_not_sent", job_id=job.job_id, error=str(error))
                    return
                await asyncio.sleep(wait)
        finally:
            self._sending.discard(job.job_id)

    async def _resend_after_outage(self) -> None:
        """The connection is back: the tensors of jobs in flight were transient and may be gone with the broker."""
        self.watch.reheard()
        now = asyncio.get_running_loop().time()
        for job_id in [j for j in self.jobs.pending if j not in self._sending]:
            job = self.jobs.retry_now(job_id, now, sent_before=self.session.connection.lost_at)
            if job is not None:
                self.session.spawn(self._send_through_outage(job))

    async def _send(self, job: PendingJob) -> None:
        """The job's inputs straight to its first parts (one frame each), then a notice to the front end, which
        tracks the job's deadline off the tensor path."""
        now = time.time()
        budget = max(0.0, job.deadline - asyncio.get_running_loop().time())
        meta = {"rid": job.request_id, "job": job.job_id, "dep": job.route, "rt": self.id, "err": job.error_to,
                "sent": now, "sub": now, "site": self._site, "origin": self._site, "budget": budget}
        if job.plan is not None:
            meta.update(model=job.deployment, plan=job.plan)
        headers = {"request_id": job.request_id, "reply_to": job.error_to}
        try:
            for name, array in job.inputs.items():
                await self.session.publisher.publish("tensors", self.names.tensor_key(job.route, name),
                                                     encode_frame(TENSORS, meta, {name: array}), headers=headers)
        except Unroutable:
            raise NotDeployed(f"not_deployed: no server serves the inputs of {job.route} (load its parts first)") \
                from None
        job.attempt_sent = asyncio.get_running_loop().time()
        # transient: after a broker restart this client sends the job (and its notice) again itself
        await self.session.publisher.publish("submit", self.names.inflight, encode_frame(NOTICE, meta, {}),
                                             headers=headers, mandatory=False, persistent=False)

    async def _tick(self) -> None:
        """Retries and deadlines of this client's jobs: an attempt that brought nothing after a share of the
        deadline is sent again (its plan chosen again: a server may be down); a job still unanswered well past its
        deadline (the front end answers it first, at its grace) is answered `deadline_exceeded` here."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(TICK_S, self.jobs.next_wakeup(loop.time())))
            now = loop.time()
            retries, answers = self.jobs.tick(now, lambda dep: self.admission.expected(dep, now))
            for answer in answers:
                job = answer.job
                self._resolve(job.job_id, ErrorResult(job_id=job.job_id, deployment=job.deployment, code=answer.code,
                                                      message=answer.message or "", where=self.id, plan=job.plan))
            for job in retries:
                to, plan, problem = route(job.deployment, self._tables.get(job.deployment), job.requirements,
                                          self.watch)
                if problem is None:
                    job.route, job.plan = to, plan
                try:
                    await self._send(job)
                except (ClientError, Exception) as exc:  # the retry could not go out: the deadline answers the job
                    self.session.log.warning("retry_failed", job_id=job.job_id, error=str(exc))

    def _error_to(self) -> str:
        """Errors about our requests go to the front end, which decides the job's one answer; without one, here."""
        return internal_reply_to(self._front) if self._front else self.id

    async def _find_front_end(self) -> None:
        """The front end's id and site (the client's site: where the inputs start), from the registry."""
        try:
            actors = await self.registry.who_hosts(timeout=min(5.0, self.settings.rpc_timeout_s))
        except (asyncio.TimeoutError, RemoteError, Unroutable):
            return
        front = next((a for a in actors if a.kind == "front_end" and a.alive), None)
        if front is not None:
            self._front, self._site = front.actor_id, front.site

    async def submit_job(self, job: InferenceJob | bytes, job_id: str | None = None) -> asyncio.Future:
        """Publish a job to the jobs queue (an InferenceJob, or raw bytes, e.g. to test the front end): the front
        end validates it and sends its inputs. Returns the answer's future (the same one for an id still
        waiting). The job is persistent: a broker restart keeps it."""
        jid = job.job_id if isinstance(job, InferenceJob) else (job_id or uuid.uuid4().hex)
        if jid in self._waiters:
            return self._waiters[jid].future
        loop = asyncio.get_running_loop()
        dtypes = {}
        if isinstance(job, InferenceJob) and job.deployment in self._manifests:
            dtypes = {t.name: t.dtype for t in self._manifests[job.deployment].outputs}
        waiter = self._waiters[jid] = _Waiter(loop.create_future(), dtypes, loop.time())
        if isinstance(job, InferenceJob) and self._front_clock_offset_s is not None:
            job = job.model_copy(update={"submitted_at": job.submitted_at + self._front_clock_offset_s})
        try:
            await self.session.publisher.publish("submit", self.names.jobs, job,
                                                 headers={"request_id": jid, "reply_to": self.id})
        except BaseException:
            self._waiters.pop(jid, None)
            raise
        return waiter.future  # its answer may be in already (an error answered at once)

    async def infer(self, deployment: str, inputs: Mapping[str, np.ndarray] | np.ndarray, *,
                    deadline_s: float | None = None, timeout: float | None = None,
                    max_latency_s: float | None = None, battery: float | None = None,
                    min_fidelity: float | None = None, min_accuracy: float | None = None) -> ResultMessage:
        """Run one job and return its ResultMessage (outputs, per-hop timings, latency, the plan that ran);
        JobFailed on an error. max_latency_s / battery / min_fidelity / min_accuracy (a deployment of model
        variants) steer a model deployment's plan choice."""
        req = Requirements(max_latency_s=max_latency_s, battery=battery, min_fidelity=min_fidelity,
                           min_accuracy=min_accuracy)
        fut = await self.submit(deployment, inputs, deadline_s=deadline_s, requirements=req)
        answer = await self.wait(fut, deadline_s, timeout)
        if isinstance(answer, ErrorResult):
            raise JobFailed(answer)
        return answer

    async def wait(self, fut: asyncio.Future, deadline_s: float | None = None, timeout: float | None = None
                   ) -> ResultMessage | ErrorResult:
        limit = timeout if timeout is not None else (deadline_s or self.settings.job_deadline_s) + ANSWER_SLACK_S
        try:
            return await asyncio.wait_for(asyncio.shield(fut), limit)
        except asyncio.TimeoutError:
            for job_id, waiting in list(self._waiters.items()):
                if waiting.future is fut:  # given up on: its slot goes to another job
                    self._resolve(job_id, ErrorResult(job_id=job_id, deployment=waiting.deployment or None,
                                                      code="timeout", message="no answer in time", where=self.id))
            raise TimeoutError(f"no answer within {limit:.1f}s: is the front end running (`splitinfer up`)?") from None

    async def input_names(self, deployment: str) -> list[str]:
        return [t.name for t in (await self.manifest(deployment)).inputs]

    async def manifest(self, deployment: str) -> Manifest:
        """The deployment's manifest from the model pool (cached); for a model deployment, its plan table too and
        its first plan's manifest (every plan takes and gives the same tensors)."""
        if deployment not in self._manifests:
            listed = deployment
            if deployment in await self.models():
                table = await self.plan_table(deployment)
                self._tables[deployment] = PlanTable.from_json(table)
                # choosing a plan avoids servers that are down: start from the registry's view of them
                self.watch.seed(await self.actors(include_dead=True))
                listed = plan_deployment_name(deployment, table["plans"][0]["id"])
            elif deployment not in await self.deployments():
                raise ClientError(f"no deployment {deployment!r} in the model pool")
            self._manifests[deployment] = await self._ask(self.pool.manifest(listed), "model pool")
        return self._manifests[deployment]

    # ------------------------------------------------------------------ cluster
    async def servers(self, include_dead: bool = False) -> list[ActorInfo]:
        """Model servers the registry knows (live ones unless include_dead)."""
        return [a for a in await self.actors(include_dead) if a.kind == "model_server"]

    async def actors(self, include_dead: bool = False) -> list[ActorInfo]:
        return await self._ask(self.registry.who_hosts(include_dead=include_dead), "registry")

    async def deployments(self) -> list[str]:
        return list((await self._ask(self.pool.listing(timeout=LISTING_TIMEOUT_S), "model pool")).deployments)

    async def models(self) -> list[str]:
        """Model deployments: names with a plan table (deploy_model), each plan a deployment `<name>:<plan>`."""
        return list((await self._ask(self.pool.listing(timeout=LISTING_TIMEOUT_S), "model pool")).models)

    async def plan_table(self, model: str) -> dict:
        """A model deployment's plan table (planner.PlanTable.to_json()): plans with predicted latency, device
        energy, fidelity, throughput, route; `primary` is the objective's best."""
        doc = await self._ask(self.pool.plan_table(model), "model pool")
        if doc is None:
            raise ClientError(f"no model deployment {model!r} in the model pool")
        return doc.table

    async def deploy_model(self, model: str | Path, name: str | None = None, *, objective: str = "latency",
                           sla_s: float | None = None, servers: list[str] | None = None,
                           input_shape: list[int] | None = None, compression: bool = False, max_plans: int = 6,
                           client_site: str | None = None, timeout: float | None = None,
                           keep_on_device: str | int | None = None, accuracy: float | None = None,
                           variants: Sequence[ModelVariant | Mapping] = ()) -> dict:
        """Ask the optimizer to profile, plan, split and deploy `model` (`keras.applications:NAME` or a .keras file,
        uploaded to the pool first) as `name`; returns its DeployReply as a dict (name, table, deployments,
        timings_s) once every plan serves. ClientError names what failed (an SLA no plan meets, a server that is
        not registered, a part that did not load): nothing is left half deployed. `keep_on_device`: a privacy floor
        (the first K operations, or every operation up to a tensor, stay on the client's device site).
        `variants`: other models answering the same jobs (ModelVariant or dicts with name, model, accuracy), the
        plan table spans them and a job's min_accuracy or budget picks; `accuracy`: the reference model's."""
        origin = await self._model_origin(model)
        try:
            variants = [v if isinstance(v, ModelVariant) else ModelVariant(**v) for v in variants]
        except ValueError as exc:
            raise ClientError(f"bad model variant: {str(exc).splitlines()[0]}") from None
        variants = [v.model_copy(update={"model": await self._model_origin(v.model)}) for v in variants]
        if name is None:
            base = re.sub(r"[^A-Za-z0-9_-]", "-", Path(origin.split(":")[-1]).stem.lower())[:40].strip("-")
            name = f"{base or 'model'}-{objective}"
        try:
            req = DeployModel(name=name, model=origin, input_shape=list(input_shape) if input_shape else None,
                              objective=objective, sla_s=sla_s, servers=list(servers or []), compression=compression,
                              max_plans=max_plans, client_site=client_site,
                              keep_on_device=None if keep_on_device is None else str(keep_on_device),
                              accuracy=accuracy, variants=variants)
        except ValueError as exc:
            raise ClientError(f"bad deploy request: {str(exc).splitlines()[0]}") from None
        limit = timeout or self.settings.deploy_timeout_s + 30
        reply = await self._ask_optimizer(self.optimizer.deploy(req, limit), f"deploy of {name}", limit)
        self._manifests.pop(name, None)
        return reply.model_dump(exclude={"v", "message"})

    async def _model_origin(self, model: str | Path) -> str:
        """`keras.applications:NAME` as it is; a .keras file uploaded to the pool's sources (`pool:<sha256>`)."""
        origin = str(model)
        if origin.startswith(APPLICATIONS_PREFIX) or origin.startswith("pool:"):
            return origin
        path = Path(origin)
        if not path.is_file() or path.suffix != ".keras":
            raise ClientError(f"{origin} is not a .keras file (or use keras.applications:NAME)")
        try:
            return await self.pool.upload_source(path)
        except (PoolError, Forbidden, asyncio.TimeoutError) as exc:
            raise ClientError(f"could not upload {path} to the model pool: {exc}") from None

    async def undeploy(self, name: str, timeout: float = 120.0) -> str:
        """Unload a deployment (a plain split, or every plan of a model) from its servers and delete it from the pool."""
        reply = await self._ask_optimizer(self.optimizer.undeploy(name, timeout), f"undeploy of {name}", timeout)
        self._manifests.pop(name, None)
        return reply.message

    async def _ask_optimizer(self, coro, what: str, timeout: float):
        try:
            return await coro
        except Unroutable:
            raise ClientError("no optimizer is running (start the cluster with `splitinfer up`)") from None
        except asyncio.TimeoutError:
            raise ClientError(f"the optimizer did not answer within {timeout:.0f}s") from None
        except (RemoteError, Forbidden) as exc:
            raise ClientError(f"{what} failed: {exc}") from None

    async def wait_for_servers(self, n: int, timeout: float = 60.0) -> list[ActorInfo]:
        """Wait until at least n model servers are alive (registered with the registry)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        live: list[ActorInfo] = []
        while True:
            try:
                live = await self.servers()
            except ClientError:
                live = []
            if len(live) >= n:
                return live
            if loop.time() >= end:
                raise ClientError(f"{len(live)} live model server(s) after {timeout:.0f}s, {n} needed")
            await asyncio.sleep(0.3)

    async def deploy(self, split_dir: str | Path, placement: Mapping[str, str | list[str]] | None = None,
                     replicas: int = 1, *, deployment: str | None = None, min_servers: int = 1,
                     timeout: float = 300.0) -> Deployment:
        """Upload a split to the model pool and have servers load its parts; returns when every replica serves.

        placement: {part: server id or [server id per replica]}; without it, parts go round-robin over the live
        servers (replica k of part i on server (i + k) mod n, so replicas of a part land on different servers).
        The deployment is named by the split's id unless `deployment` names it: the same split deployed again onto
        other servers adds replicas to that deployment; give another name for a separate one."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            manifest = Manifest.load(Path(split_dir))
        except SplitError as exc:
            raise ClientError(str(exc)) from None
        if replicas < 1:
            raise ClientError("replicas must be at least 1")
        live = await self.wait_for_servers(max(1, min_servers), timeout=min(timeout, 60.0))
        plan = self._placement(manifest, placement, replicas, [s.actor_id for s in live])
        try:
            dep = await self.pool.upload_split(Path(split_dir), deployment)
        except (PoolError, Forbidden) as exc:
            raise ClientError(str(exc)) from None
        except asyncio.TimeoutError:
            raise ClientError("the model pool did not answer the upload: is the cluster up?") from None
        answers = await self.orders.load(dep, plan, timeout=max(10.0, timeout - (loop.time() - t0)))
        failed = failures(answers)
        if failed:
            raise ClientError(failed)
        self._manifests[dep] = manifest
        return Deployment(dep, plan, [t.name for t in manifest.inputs], manifest.output_names,
                          load_s=loop.time() - t0)

    @staticmethod
    def _placement(manifest: Manifest, placement: Mapping[str, str | list[str]] | None, replicas: int,
                   ids: list[str]) -> dict[str, list[str]]:
        parts = [p.name for p in manifest.parts]
        if placement is None:
            if replicas > len(ids):
                raise ClientError(f"{replicas} replicas per part need {replicas} live servers; {len(ids)} are live")
            return {p: [ids[(i + k) % len(ids)] for k in range(replicas)] for i, p in enumerate(parts)}
        plan = {p: [s] if isinstance(s, str) else list(s) for p, s in placement.items()}
        unknown = [p for p in plan if p not in parts]
        if unknown:
            raise ClientError(f"placement names part {unknown[0]!r}; the split has {parts}")
        missing = [p for p in parts if p not in plan]
        if missing:
            raise ClientError(f"placement does not place part {missing[0]!r}")
        dead = sorted({s for servers in plan.values() for s in servers if s not in ids})
        if dead:
            raise ClientError(f"placement uses server(s) {dead} that are not live (live: {ids})")
        if any(not servers for servers in plan.values()):
            raise ClientError("every part needs at least one server")
        twice = [p for p, servers in plan.items() if len(set(servers)) != len(servers)]
        if twice:
            raise ClientError(f"placement puts two replicas of {twice[0]!r} on one server")
        return plan

    async def set_links(self, links: Mapping[str, object], *, emulate: bool | None = True, default=None,
                        replace: bool = True) -> None:
        """Change the emulated links of every running actor (SetLinks on `<ns>.control`, key `links.set`).
        links: {"siteA-siteB": LinkSpec | (rtt seconds, bandwidth bytes/s or None)}; `emulate` turns emulation
        on/off (None: leave it). Takes effect for tensors received after the order arrives."""

        def spec(v) -> LinkSpec:
            if isinstance(v, LinkSpec):
                return v
            rtt, bw = v
            return LinkSpec(rtt_ms=float(rtt) * 1e3, bandwidth_mbps=None if bw is None else float(bw) / MBIT)

        msg = SetLinks(links={k: spec(v) for k, v in links.items()}, emulate=emulate, replace=replace,
                       default=None if default is None else spec(default))
        await self.session.publisher.publish("control", Names.LINKS_SET, msg, mandatory=False)

    async def cluster_state(self, include_dead: bool = False) -> ClusterState:
        """The state pool's ClusterState: every actor's latest monitor state and every measured link."""
        return await self._ask(self.state_pool.get_state(include_dead, timeout=min(10.0, self.settings.rpc_timeout_s)),
                               "state pool")

    # ------------------------------------------------------------------ the dead-letter queue, the namespace
    async def dead_letters(self, limit: int = 10) -> tuple[int, list[DeadLetter]]:
        """(how many dead letters, the oldest `limit` of them with why they are there); they stay in the queue."""
        async with self._dead_letter_channel() as ch:
            return await dlq.count(ch, self.names), await dlq.peek(ch, self.names, limit)

    async def requeue_dead_letters(self, limit: int | None = None) -> tuple[int, int]:
        """Send dead letters back where they were going: (sent back, left in the queue)."""
        async with self._dead_letter_channel(on_return_raises=True) as ch:
            return await dlq.requeue(ch, self.names, limit)

    async def purge_dead_letters(self) -> int:
        async with self._dead_letter_channel() as ch:
            return await dlq.purge(ch, self.names)

    @contextlib.asynccontextmanager
    async def _dead_letter_channel(self, on_return_raises: bool = False):
        try:
            async with self.session.connection.scratch_channel(on_return_raises=on_return_raises) as ch:
                yield ch
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise ClientError(f"no dead-letter queue in namespace {self.names.ns!r} (nothing ran there yet)") \
                from None

    async def supervised(self) -> bool:
        """Whether a `splitinfer up` runs this namespace (its supervisor holds the namespace's lock queue)."""
        async with self.session.connection.scratch_channel() as ch:
            return await holds_lock(ch, self.names.supervisor_lock)

    async def queue_depths(self, queues: list[str]) -> dict[str, int | None]:
        """Messages ready in each named queue (None: no such queue)."""
        out: dict[str, int | None] = {}
        for name in queues:
            try:
                async with self.session.connection.scratch_channel() as ch:
                    q = await ch.declare_queue(name, passive=True)
                    out[name] = int(q.declaration_result.message_count or 0)
            except Exception:
                out[name] = None
        return out


# --------------------------------------------------------------------------------------------- plain helpers

async def publish_job(job: InferenceJob | bytes, settings: Settings | None = None, *,
                      channel: aio_pika.abc.AbstractChannel | None = None, job_id: str | None = None,
                      reply_to: str | None = None) -> str:
    """Put one job on `<ns>.jobs` (publisher-confirmed). Returns the job id. Answers go to `<ns>.results` with key
    job.reply_to (default: the job id): see subscribe_results."""
    settings = settings or get_settings()
    names = Names(settings.namespace)
    jid = job.job_id if isinstance(job, InferenceJob) else (job_id or uuid.uuid4().hex)
    reply = (job.reply_to if isinstance(job, InferenceJob) else None) or reply_to or jid
    body = job if isinstance(job, (bytes, bytearray)) else encode(job)
    conn = None
    if channel is None:
        conn = await connect_once(settings.broker_url)
        channel = await conn.channel(publisher_confirms=True)
    try:
        submit = await channel.get_exchange(names.submit)
        await submit.publish(
            aio_pika.Message(bytes(body), headers={"request_id": jid, "reply_to": reply},
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=names.jobs, mandatory=True)
    finally:
        if conn is not None:
            await conn.close()
    return jid


async def subscribe_results(key: str = "#", settings: Settings | None = None, *,
                            ready: asyncio.Event | None = None, dedupe: bool = True
                            ) -> AsyncIterator[ResultMessage | ErrorResult]:
    """Yield every ResultMessage / ErrorResult published on `<ns>.results` with routing key `key` (a job id or a
    reply_to; "#" for all) from the moment of subscribing. `ready` is set once the queue is bound. Answers are
    delivered at least once on the wire (a job recomputed after a crash or a broker restart may be answered
    again): each job's first answer is yielded, later ones dropped (`dedupe=False`: all, as they come)."""
    settings = settings or get_settings()
    names = Names(settings.namespace)
    conn = await connect_failover(settings.broker_url, f"results@{names.ns}")  # carries on through a node loss
    try:
        ch = await conn.channel()
        ex = await ch.declare_exchange(names.results, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(exclusive=True, auto_delete=True)
        await q.bind(ex, routing_key=key if key == "#" else names.result_key(key))
        if ready is not None:
            ready.set()
        seen: OrderedDict[str, None] = OrderedDict()  # answers are at least once on the wire; yielded once here
        async with q.iterator() as it:
            async for message in it:
                async with message.process():
                    if is_internal_key(message.routing_key):
                        continue  # a notice between actors about one attempt, not an answer
                    try:
                        msg = result_message(decode_frame(message.body, settings.max_message_bytes)) \
                            if is_frame(message.body) else \
                            decode(message.body, max_bytes=settings.max_message_bytes,
                                   expect=(ResultMessage, ErrorResult))
                    except MessageError:
                        continue
                    if dedupe and msg.job_id:
                        if msg.job_id in seen:
                            continue
                        seen[msg.job_id] = None
                        if len(seen) > SEEN_ANSWERS:
                            seen.popitem(last=False)
                    yield msg
    finally:
        await conn.close()


__all__ = ["Client", "ClientError", "Deployment", "JobFailed", "publish_job", "subscribe_results"]
