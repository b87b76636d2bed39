"""Front end: inference jobs in, one answer per job out.

Flow: consume `<ns>.jobs`, validate the job against the deployment's manifest (for a model deployment, choose the
plan from its plan table by the job's requirements, the device's battery and which servers heartbeat), publish
its input tensors to `<ns>.tensors` (key `<deployment>.<tensor>`, header request_id), collect the final outputs on
a queue of its own bound to the final tensors' keys, and publish one ResultMessage (outputs + per-hop timings) or
one ErrorResult to `<ns>.results` with routing key reply_to.

The bookkeeping (`JobTracker`) is pure and synchronous so it can be reasoned about and tested on its own:
- each attempt of a job runs under its own request id (`<job_id>` for the first, `<job_id>~<n>` after; a job the
  broker redelivers after a front-end crash starts at `<job_id>~r<random>`), so a model server's done-request LRU
  never swallows a retry;
- a job past its deadline is answered with a `deadline_exceeded` error, also one that was already late on arrival;
- if an attempt produced nothing after `attempt_timeout_s` (a share of the deadline), one retry (MAX_RETRIES) is
  sent while the deadline still allows it;
- the first complete result or error wins; whatever arrives for an answered job is dropped (bounded memory).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

MAX_RETRIES = 1
RETRY_SEP = "~"
ANSWERED_MEMORY = 10_000


def attempt_request_id(job_id: str, attempt: int, first: str | None = None) -> str:
    if attempt == 0:
        return first or job_id
    return f"{job_id}{RETRY_SEP}{attempt}"


def redelivered_request_id(job_id: str) -> str:
    """First request id for a job redelivered to a (restarted) front end: the crashed one may have used job_id and
    job_id~1 already, and servers drop request ids they have served."""
    import uuid

    return f"{job_id}{RETRY_SEP}r{uuid.uuid4().hex[:8]}"


@dataclass
class PendingJob:
    job_id: str
    deployment: str
    reply_to: str
    inputs: dict[str, Any]
    final_outputs: list[str]
    received_at: float            # monotonic
    deadline: float               # monotonic
    attempt_timeout_s: float
    attempt: int = 0
    attempt_started: float = 0.0
    first_request_id: str | None = None  # set for a redelivered job (see redelivered_request_id)
    route: str = ""               # the deployment the inputs go to: `deployment`, or its chosen plan's
    plan: str | None = None       # the chosen plan's id, when `deployment` is a model with a plan table
    requirements: Any = None      # the job's Requirements (a retry chooses its plan again)
    outputs: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, list] = field(default_factory=dict)   # tensor -> hops that produced it
    served_by: list[str] = field(default_factory=list)
    ack: Any = None               # whatever the transport needs to ack the job message once answered

    @property
    def request_id(self) -> str:
        return attempt_request_id(self.job_id, self.attempt, self.first_request_id)


@dataclass
class Answer:
    """What the transport must publish for a job: a result (outputs) or an error."""

    job: PendingJob
    kind: str                     # "result" | "error"
    code: str | None = None
    message: str | None = None
    latency_s: float = 0.0


class JobTracker:
    def __init__(self, max_retries: int = MAX_RETRIES, retry_share: float = 0.5):
        self.max_retries = max_retries
        self.retry_share = retry_share
        self.pending: dict[str, PendingJob] = {}        # job_id -> job
        self.by_request: dict[str, str] = {}            # request id of every attempt of a pending job -> job_id
        self.answered: OrderedDict[str, None] = OrderedDict()

    # -- intake
    def is_answered(self, job_id: str) -> bool:
        return job_id in self.answered

    def admit(self, job: PendingJob, now: float | None = None) -> Answer | None:
        """Register a job; an Answer (error) if it cannot run: already answered, duplicate or already late."""
        now = time.monotonic() if now is None else now
        if job.job_id in self.answered or job.job_id in self.pending:
            return Answer(job, "error", "duplicate_job", f"job {job.job_id} was already submitted")
        if now >= job.deadline:
            return self._finish(job, Answer(job, "error", "deadline_exceeded",
                                            f"job {job.job_id} reached the front end after its deadline"), now)
        job.attempt_started = now
        self.pending[job.job_id] = job
        self.by_request[job.request_id] = job.job_id
        return None

    def _job_of(self, request_id: str) -> PendingJob | None:
        """The pending job a request id belongs to, any attempt (a late first attempt's output is the same work)."""
        job_id = self.by_request.get(request_id)
        return None if job_id is None else self.pending.get(job_id)

    # -- data back from the parts
    def on_output(self, request_id: str, tensor: str, array: Any, hops: list | None, server: str | None,
                  now: float | None = None) -> Answer | None:
        job = self._job_of(request_id)
        if job is None:
            return None
        if tensor not in job.final_outputs or tensor in job.outputs:
            return None
        job.outputs[tensor] = array
        job.timings[tensor] = list(hops or [])
        if server and server not in job.served_by:
            job.served_by.append(server)
        if len(job.outputs) == len(job.final_outputs):
            now = time.monotonic() if now is None else now
            return self._finish(job, Answer(job, "result"), now)
        return None

    def on_error(self, request_id: str, code: str, message: str, now: float | None = None) -> Answer | None:
        job = self._job_of(request_id)
        if job is None:
            return None
        now = time.monotonic() if now is None else now
        return self._finish(job, Answer(job, "error", code, message), now)

    # -- time passing
    def tick(self, now: float | None = None) -> tuple[list[PendingJob], list[Answer]]:
        """(jobs to resend under their new request id, answers for jobs past their deadline)."""
        now = time.monotonic() if now is None else now
        retries, answers = [], []
        for job in list(self.pending.values()):
            if now >= job.deadline:
                answers.append(self._finish(job, Answer(
                    job, "error", "deadline_exceeded",
                    f"job {job.job_id} got no result within its deadline of {job.deadline - job.received_at:.3g}s "
                    f"({job.attempt + 1} attempt{'s' if job.attempt else ''}; "
                    f"outputs missing: {', '.join(t for t in job.final_outputs if t not in job.outputs)})"), now))
            elif (job.attempt < self.max_retries and not job.outputs
                  and now - job.attempt_started >= job.attempt_timeout_s):
                job.attempt += 1
                job.attempt_started = now
                self.by_request[job.request_id] = job.job_id
                retries.append(job)
        return retries, answers

    def next_wakeup(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        times = [j.deadline for j in self.pending.values()]
        times += [j.attempt_started + j.attempt_timeout_s for j in self.pending.values()
                  if j.attempt < self.max_retries and not j.outputs]
        return max(0.0, min(times) - now) if times else 1.0

    # -- bookkeeping
    def _finish(self, job: PendingJob, answer: Answer, now: float) -> Answer:
        self.pending.pop(job.job_id, None)
        for k in range(job.attempt + 1):
            self.by_request.pop(attempt_request_id(job.job_id, k, job.first_request_id), None)
        self.answered[job.job_id] = None
        while len(self.answered) > ANSWERED_MEMORY:
            self.answered.popitem(last=False)
        answer.latency_s = now - job.received_at
        return answer


# --------------------------------------------------------------------------------------------------- the actor

import asyncio  # noqa: E402
import contextlib  # noqa: E402

from splitinfer.actors.base import Actor, ActorStopped, header_str, run_actor  # noqa: E402
from splitinfer.actors.topology import escape_key, queue_arguments  # noqa: E402
from splitinfer.messages import (  # noqa: E402
    Deregister,
    ErrorResult,
    Heartbeat,
    Hop,
    InferenceJob,
    ListDeployments,
    MessageError,
    PartRequest,
    PlanTableMessage,
    PoolManifest,
    Reply,
    ResultMessage,
    TensorMessage,
    check_tensor,
    decode,
    decompress_array,
)

MANIFEST_FILE = "manifest.json"
INTERNAL_PREFIX = "~fe:"
TICK_MAX_S = 0.25


class FrontEnd(Actor):
    """Consumes `<ns>.jobs`; answers each job once on `<ns>.results` (key reply_to or job id)."""

    kind = "front_end"

    def __init__(self, actor_id: str = "front_end", settings=None, site: str = ""):
        # the front end's site is the client's: the job's inputs leave from it and its outputs come back to it
        super().__init__(actor_id, settings, site=site)
        self.tracker = JobTracker()
        self.manifests: dict[str, Any] = {}
        self.plans: dict[str, Any] = {}           # model deployment -> its PlanTable (planner.table)
        self.servers = ServerWatch(self.settings.liveness_timeout_s)
        self._manifest_locks: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self.inbox = None

    @property
    def inbox_name(self) -> str:
        return f"{self.names.ns}.front_end.{escape_key(self.id)}"

    @property
    def internal_reply_to(self) -> str:
        """reply_to carried by the tensors we send: a model server's error about them comes back here (not to the
        user), and the front end turns it into the job's one answer. The result store skips INTERNAL_PREFIX keys."""
        return f"{INTERNAL_PREFIX}{self.id}"

    async def setup(self) -> None:
        assert self.channel is not None
        self.inbox = await self.channel.declare_queue(self.inbox_name, exclusive=True, auto_delete=True)
        await self.inbox.bind(self.exchanges["results"], routing_key=self.names.result_key(self.internal_reply_to))
        # errors any actor publishes also go to control error.<actor>: catches the ones without our reply_to
        await self.inbox.bind(self.exchanges["control"], routing_key="error.*")
        await self.consume(self.inbox, self.on_inbox)
        jobs = await self.channel.declare_queue(
            self.names.jobs, durable=True,
            arguments=queue_arguments(self.names, expires_s=self.settings.queue_expires_s))
        await self.consume(jobs, self.on_job)
        # heartbeats (who is down, the device's battery) and pushed plan tables, for the choice of a plan per job
        watch = await self.channel.declare_queue(f"{self.inbox_name}.watch", exclusive=True, auto_delete=True)
        for key in ("heartbeat.*", "deregister.*", "plans.*"):
            await watch.bind(self.exchanges["control"], routing_key=key)
        await self.consume(watch, self.on_watch)
        self.spawn(self._timer_loop(), name="deadlines")
        from splitinfer.actors.monitors import NetworkMonitor, follow_links

        await follow_links(self)  # SetLinks orders, network probes
        NetworkMonitor(self).start()
        self.log("serving", jobs=self.names.jobs, inbox=self.inbox_name)

    # ------------------------------------------------------------------ jobs in
    async def on_job(self, message) -> None:
        received, received_wall = time.monotonic(), time.time()
        try:
            job = self.decode(message, expect=InferenceJob)
        except MessageError as exc:
            await self.dead_letter(message, exc)
            return
        assert isinstance(job, InferenceJob)
        reply_to = job.reply_to or header_str(message, "reply_to") or job.job_id
        if self.tracker.is_answered(job.job_id) or job.job_id in self.tracker.pending:
            # a job id we answered or are running: never answer twice
            pending = self.tracker.pending.get(job.job_id)
            if pending is not None and message.redelivered:
                # our channel was lost and the broker handed the job back: the old delivery tag is dead, so this
                # is the one to ack when the answer goes out
                pending.ack = message
            else:
                self.log.warning("duplicate_job_dropped", job_id=job.job_id, redelivered=message.redelivered)
                await self.ack(message)
            return
        manifest, problem = await self.manifest(job.deployment)
        if manifest is None:
            await self._reject(message, job, reply_to, *problem)
            return
        bad = self._check_inputs(job, manifest)
        if bad is not None:
            await self._reject(message, job, reply_to, *bad)
            return
        route, plan_id, problem = self._route(job.deployment, job.requirements)
        if problem is not None:
            await self._reject(message, job, reply_to, *problem)
            return
        deadline_s = job.deadline_s or self.settings.job_deadline_s
        # time already spent since submission (queueing) counts against the deadline; a clock ahead of ours
        # (submitted_at in the future) does not extend it
        remaining = min(deadline_s, job.submitted_at + deadline_s - received_wall)
        pending = PendingJob(
            job_id=job.job_id, deployment=job.deployment, reply_to=reply_to, inputs=dict(job.inputs),
            final_outputs=manifest.output_names, received_at=received, deadline=received + remaining,
            attempt_timeout_s=max(0.05, deadline_s * self.tracker.retry_share), ack=message,
            first_request_id=redelivered_request_id(job.job_id) if message.redelivered else None,
            route=route, plan=plan_id, requirements=job.requirements,
        )
        # the first hop: the job's trip from the submitter to here (clocks of one machine; across machines it
        # includes their offset, so it is clamped at 0)
        pending.timings["(job)"] = [Hop(part="job", server=self.id, transfer_s=max(0.0, received_wall - job.submitted_at),
                                        finished_at=received_wall)]
        early = self.tracker.admit(pending, received)
        if early is not None:
            await self._answer(early)
            return
        await self._send_inputs(pending)
        self._wake.set()

    def _route(self, deployment: str, requirements) -> tuple[str, str | None, tuple[str, str] | None]:
        """(deployment to send to, plan id, None) or (.., .., (code, reason)). A model deployment's plan comes from
        its table by the job's requirements, with the device's reported battery when the job gives none, avoiding
        servers that stopped heartbeating (the fallback when a server of the best plan is down)."""
        table = self.plans.get(deployment)
        if table is None:
            return deployment, None, None
        from splitinfer.planner import PlanError, choose_plan, plan_deployment_name

        battery = requirements.battery if requirements.battery is not None else self.servers.battery(table.client)
        try:
            plan = choose_plan(table, requirements.max_latency_s, battery, requirements.min_fidelity,
                               self.servers.down(table.servers))
        except PlanError as exc:
            return deployment, None, ("no_plan", str(exc))
        return plan_deployment_name(deployment, plan.id), plan.id, None

    def _check_inputs(self, job: InferenceJob, manifest) -> tuple[str, str] | None:
        want = [t.name for t in manifest.inputs]
        missing = [n for n in want if n not in job.inputs]
        extra = [n for n in job.inputs if n not in want]
        if missing or extra:
            return ("bad_inputs", f"deployment {job.deployment} takes inputs {want}; "
                                  f"missing {missing}, unexpected {extra}")
        batch = None
        for spec in manifest.inputs:
            arr = job.inputs[spec.name]
            try:
                check_tensor(arr, spec.shape, spec.dtype, name=f"input {spec.name}", job_id=job.job_id)
            except MessageError as exc:
                return exc.code, exc.reason
            if arr.ndim and batch is not None and arr.shape[0] != batch:
                return "wrong_shape", f"input {spec.name}: batch {arr.shape[0]}, other inputs have {batch}"
            batch = arr.shape[0] if arr.ndim else batch
        if batch == 0:
            return "wrong_shape", "inputs have an empty batch"
        return None

    async def _reject(self, message, job: InferenceJob, reply_to: str, code: str, reason: str) -> None:
        """A job that cannot run: one error answer, then the job goes to the dead-letter queue."""
        self.tracker.answered[job.job_id] = None
        await self.publish_error(job.job_id, code, reason, reply_to=reply_to, deployment=job.deployment)
        self.stats["errors"] += 1
        self.log.warning("job_rejected", job_id=job.job_id, code=code, reason=reason)
        self._inflight.pop(id(message), None)
        with contextlib.suppress(Exception):
            await message.reject(requeue=False)

    async def _send_inputs(self, job: PendingJob) -> None:
        rid = job.request_id
        route = job.route or job.deployment
        wall_deadline = time.time() + max(0.0, job.deadline - time.monotonic())
        sends = [
            self.publish("tensors", self.names.tensor_key(route, name),
                         TensorMessage(request_id=rid, deployment=route, tensor=name, array=arr,
                                       server=self.id, deadline=wall_deadline, reply_to=self.internal_reply_to,
                                       site=self.site),
                         headers={"request_id": rid, "reply_to": self.internal_reply_to})
            for name, arr in job.inputs.items()
        ]
        results = await asyncio.gather(*sends, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            exc = failed[0]
            unroutable = "unroutable" in str(exc).lower() or "NO_ROUTE" in str(exc) or "312" in str(exc)
            code = "not_deployed" if unroutable else "publish_failed"
            reason = (f"no server serves an input of deployment {route} (load its parts first)"
                      if unroutable else f"could not send the inputs: {type(exc).__name__}: {exc}")
            answer = self.tracker.on_error(rid, code, reason)
            if answer is not None:
                await self._answer(answer)
        else:
            self.log("job_sent", job_id=job.job_id, request_id=rid, attempt=job.attempt, route=route)

    # ------------------------------------------------------------------ outputs and errors back
    async def on_inbox(self, message) -> None:
        await self.ack(message)  # exclusive queue: nothing to hand back if we die; the job itself is still unacked
        key = message.routing_key or ""
        if message.exchange != self.names.tensors:  # an error: from results (our reply_to) or control error.*
            if key == self.names.error_key(self.id):
                return
            try:
                err = decode(message.body, max_bytes=self.settings.max_message_bytes, expect=ErrorResult)
            except MessageError:
                return
            if not err.job_id:
                return
            answer = self.tracker.on_error(err.job_id, err.code, f"{err.message} (at {err.where})")
            if answer is not None:
                await self._answer(answer)
            return
        try:
            msg = self.decode(message, expect=TensorMessage)
        except MessageError as exc:
            self.log.warning("bad_output", error=exc.reason, key=key)
            return
        assert isinstance(msg, TensorMessage)
        # link emulation: a final output from another site arrives RTT + bytes/bandwidth later (0 when off)
        delay = self.links.delay(msg.site, self.site, msg.array.nbytes, time.time())
        if delay > 0:
            await asyncio.sleep(delay)
        if msg.codec is not None:  # a plan that sends the final output compressed: the user gets the model's dtype
            view = self.manifests.get(msg.deployment)
            try:
                msg.array = decompress_array(msg.array, msg.codec, msg.scale,
                                             view.output_dtypes.get(msg.tensor, "float32") if view else "float32")
            except MessageError as exc:
                answer = self.tracker.on_error(msg.request_id, exc.code, f"{msg.tensor}: {exc.reason}")
                if answer is not None:
                    await self._answer(answer)
                return
        received = time.time()
        hops = list(msg.hops)
        hops.append(Hop(part="result", server=self.id, transfer_s=max(0.0, received - msg.sent_at),
                        finished_at=received))
        answer = self.tracker.on_output(msg.request_id, msg.tensor, msg.array, hops, msg.server or None)
        if answer is not None:
            await self._answer(answer)

    async def _answer(self, answer: Answer, publish: bool = True) -> None:
        job = answer.job
        key = self.names.result_key(job.reply_to or job.job_id)
        try:
            if publish and answer.kind == "result":
                msg = ResultMessage(job_id=job.job_id, deployment=job.deployment, outputs=job.outputs,
                                    hops=_merge_hops(job), latency_s=answer.latency_s, served_by=job.served_by,
                                    plan=job.plan, plan_deployment=job.route if job.plan else None)
                await self.publish("results", key, msg, mandatory=False)
            elif publish:
                await self.publish_error(job.job_id, answer.code or "error", answer.message or "",
                                         reply_to=job.reply_to, deployment=job.deployment, plan=job.plan)
        except Exception as exc:  # the answer could not be confirmed: hand the job back for a new try
            self.log.error("answer_failed", job_id=job.job_id, error=f"{type(exc).__name__}: {exc}")
            self.tracker.answered.pop(job.job_id, None)
            if job.ack is not None:
                await self.nack(job.ack, requeue=True)
            return
        if answer.kind == "result":
            self.stats["processed"] += 1
        else:
            self.stats["errors"] += 1
        self.log("job_answered", job_id=job.job_id, kind=answer.kind, code=answer.code,
                 latency_ms=round(answer.latency_s * 1e3, 2), attempts=job.attempt + 1)
        if job.ack is not None:
            await self.ack(job.ack)

    # ------------------------------------------------------------------ deadlines and retries
    async def _timer_loop(self) -> None:
        while not self.stopping:
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(TICK_MAX_S, self.tracker.next_wakeup()))
            retries, answers = self.tracker.tick()
            for answer in answers:
                await self._answer(answer)
            for job in retries:
                if job.plan is not None:  # a model deployment: the best plan may have changed (a server died)
                    route, plan_id, problem = self._route(job.deployment, job.requirements)
                    if problem is None:
                        job.route, job.plan = route, plan_id
                self.log.warning("job_retry", job_id=job.job_id, request_id=job.request_id, route=job.route)
                await self._send_inputs(job)

    # ------------------------------------------------------------------ manifests from the model pool
    async def manifest(self, deployment: str):
        """(manifest, None) or (None, (code, reason))."""
        if deployment in self.manifests:
            return self.manifests[deployment], None
        lock = self._manifest_locks.setdefault(deployment, asyncio.Lock())
        async with lock:
            if deployment in self.manifests:
                return self.manifests[deployment], None
            try:
                listing = await self.rpc(self.names.POOL_REQUEST, ListDeployments(),
                                         timeout=min(5.0, self.settings.rpc_timeout_s))
                known = listing.data.get("deployments", []) if isinstance(listing, Reply) else []
                models = listing.data.get("models", []) if isinstance(listing, Reply) else []
                if deployment in models:
                    return await self._load_model(deployment)
                if deployment not in known:
                    return None, ("unknown_deployment", f"no deployment {deployment!r} in the model pool "
                                                        f"(it has: {', '.join(models + known) or 'none'})")
                reply = await self.rpc(self.names.POOL_REQUEST, PartRequest(deployment=deployment, file=MANIFEST_FILE),
                                       timeout=min(5.0, self.settings.rpc_timeout_s))
            except (asyncio.TimeoutError, TimeoutError):
                return None, ("pool_unavailable", "the model pool did not answer; is `splitinfer up` running?")
            except (ActorStopped, MessageError) as exc:
                return None, ("pool_unavailable", str(exc))
            if isinstance(reply, Reply) and not reply.ok:
                return None, ("unknown_deployment", f"no deployment {deployment!r} in the model pool"
                              + (f" ({reply.message})" if reply.message else ""))
            if not isinstance(reply, PoolManifest):
                return None, ("pool_unavailable", f"the model pool answered {type(reply).__name__}")
            try:
                manifest = DeploymentView.from_json(reply.manifest)
            except (ValueError, KeyError, TypeError) as exc:
                return None, ("bad_manifest", f"deployment {deployment}: {type(exc).__name__}: {exc}")
            await self._listen(deployment, manifest)
            return manifest, None

    async def _listen(self, deployment: str, manifest: "DeploymentView") -> None:
        assert self.inbox is not None
        for name in manifest.output_names:
            await self.inbox.bind(self.exchanges["tensors"], routing_key=self.names.tensor_key(deployment, name))
        self.manifests[deployment] = manifest
        self.log("deployment_known", deployment=deployment, inputs=[t.name for t in manifest.inputs],
                 outputs=manifest.output_names)

    async def _load_model(self, model: str):
        """A model deployment: its plan table, and every plan's manifest (all plans take and give the same tensors;
        the first one's view validates the jobs). Called under the model's manifest lock."""
        from splitinfer.actors.model_pool import fetch_plan_table
        from splitinfer.planner import PlanTable, plan_deployment_name

        doc = await fetch_plan_table(self, model)
        if doc is None or "table" not in doc:
            return None, ("unknown_deployment", f"no plan table for {model!r} in the model pool")
        table = PlanTable.from_json(doc["table"])
        first = None
        for plan in table.plans:
            dep = plan_deployment_name(model, plan.id)
            reply = await self.rpc(self.names.POOL_REQUEST, PartRequest(deployment=dep, file=MANIFEST_FILE),
                                   timeout=min(5.0, self.settings.rpc_timeout_s))
            if not isinstance(reply, PoolManifest):
                return None, ("unknown_deployment", f"plan {plan.id} of {model}: {getattr(reply, 'message', reply)}")
            view = DeploymentView.from_json(reply.manifest)
            await self._listen(dep, view)
            first = first or view
        if first is None:
            return None, ("unknown_deployment", f"the plan table of {model!r} is empty")
        self.plans[model] = table
        self.manifests[model] = first
        self.log("model_known", model=model, plans=[f"{p.id}: {p.describe()}" for p in table.plans])
        return first, None

    # ------------------------------------------------------------------ servers' state and plan tables
    async def on_watch(self, message) -> None:
        await self.ack(message)  # exclusive queue: state is refreshed by the next message anyway
        try:
            msg = decode(message.body, max_bytes=self.settings.max_message_bytes,
                         expect=(Heartbeat, Deregister, PlanTableMessage))
        except MessageError as exc:
            self.log.warning("bad_control", error=exc.reason)
            return
        if isinstance(msg, Heartbeat):
            self.servers.heartbeat(msg.actor_id, msg.state)
        elif isinstance(msg, Deregister):
            self.servers.deregister(msg.actor_id)
        elif msg.name in self.plans:
            self._update_plans(msg)

    def _update_plans(self, msg: PlanTableMessage) -> None:
        """New predictions for a known model: take them; different plans (a redeploy) or none (undeployed): forget
        the model, so the next job loads it again."""
        import json

        from splitinfer.planner import PlanTable

        try:
            doc = json.loads(msg.table)
            table = PlanTable.from_json(doc["table"]) if doc.get("table") else None
        except (ValueError, KeyError, TypeError) as exc:
            self.log.warning("bad_plan_table", model=msg.name, error=f"{type(exc).__name__}: {exc}")
            return
        old = self.plans.get(msg.name)
        if table is not None and old is not None and [p.id for p in table.plans] == [p.id for p in old.plans] \
                and [p.key() for p in table.plans] == [p.key() for p in old.plans]:
            self.plans[msg.name] = table
            return
        self.plans.pop(msg.name, None)
        self.manifests.pop(msg.name, None)


class ServerWatch:
    """Which servers are down (no heartbeat within the liveness timeout, or deregistered) and their last state:
    the front end's own view, from the heartbeats every actor publishes, so a plan choice needs no RPC."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        self.seen: dict[str, tuple[float, Any]] = {}
        self.gone: set[str] = set()

    def heartbeat(self, actor_id: str, state, now: float | None = None) -> None:
        self.seen[actor_id] = (time.monotonic() if now is None else now, state)
        self.gone.discard(actor_id)

    def deregister(self, actor_id: str) -> None:
        self.gone.add(actor_id)

    def down(self, servers, now: float | None = None) -> set[str]:
        """Of `servers`, those not heard from lately; one never heard from counts as down once this watch has run
        for a liveness timeout (before that, the front end may just have started). A plan table's stand-in client
        (`client@<site>`) is not a process and never down."""
        now = time.monotonic() if now is None else now
        out = set()
        for s in servers:
            if s.startswith("client@"):
                continue
            last = self.seen.get(s)
            if s in self.gone or (last is None and now - self.started > self.timeout_s) or \
                    (last is not None and now - last[0] > self.timeout_s):
                out.add(s)
        return out

    def battery(self, actor_id: str) -> float | None:
        last = self.seen.get(actor_id)
        return None if last is None else getattr(last[1], "battery", None)


@dataclass
class TensorView:
    name: str
    shape: list
    dtype: str


@dataclass
class DeploymentView:
    """What the front end needs of a deployment's manifest: its inputs (name, shape, dtype) and final outputs.
    Read from the manifest JSON directly: the Manifest model lives in splitinfer.splitter, whose package import
    loads TensorFlow, which the front end has no other use for (start-up time and memory)."""

    inputs: list[TensorView]
    output_names: list[str]
    output_dtypes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> "DeploymentView":
        import json

        d = json.loads(text)
        inputs = [TensorView(str(t["name"]), list(t["shape"]), str(t["dtype"])) for t in d["inputs"]]
        outputs = [str(t["name"]) for t in d["outputs"]]
        if not inputs or not outputs:
            raise ValueError("manifest lists no inputs or no outputs")
        return cls(inputs, outputs, {str(t["name"]): str(t["dtype"]) for t in d["outputs"]})


def _merge_hops(job: PendingJob) -> list[Hop]:
    """The hops behind every final output, each once, in the order they finished."""
    seen, out = set(), []
    for hops in job.timings.values():
        for h in hops:
            key = (h.part, h.server, h.finished_at)
            if key not in seen:
                seen.add(key)
                out.append(h)
    return sorted(out, key=lambda h: h.finished_at)


def main(argv: list[str] | None = None) -> None:
    """`python -m splitinfer.actors.front_end [--id ID]`"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m splitinfer.actors.front_end")
    parser.add_argument("--id", default="front_end")
    parser.add_argument("--site", default="", help="the client's site (link emulation, network monitor)")
    args = parser.parse_args(argv)
    run_actor(FrontEnd(args.id, site=args.site))


if __name__ == "__main__":
    main()
