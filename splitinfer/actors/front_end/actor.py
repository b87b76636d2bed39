"""The front end actor: every job answered once, while staying off the tensor path.

Two ways in:
- the Client sends a job's input tensors to its first parts itself (it chose the plan), and a notice (the job's
  meta, no tensors) to the front end's `<ns>.inflight` queue: the front end tracks the job's deadline from it and
  acks the notice once the job is answered; the Client holds the inputs and re-sends them when a retry is due;
- a job published to `<ns>.jobs` (an InferenceJob): the front end validates it against the deployment's manifest,
  chooses the plan of a model deployment, publishes its input tensors to `<ns>.tensors` itself, retries it, and
  acks the job once it is answered.

The answer does not pass through the front end: the part that produces the final outputs publishes them once to
`<ns>.results` with the caller's key, where the caller, the result store and the front end's `answers` queue all
read it (bindings, not a relay). The front end publishes an answer only when it must: an error (a part's error,
a job that cannot run, a deadline passed with its grace), or the result of a deployment whose final outputs leave
from several parts, which it assembles. The bookkeeping is `tracker.JobTracker`.

    python -m splitinfer.actors.front_end [--id front_end] [--site SITE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.actor import Actor, run_actor
from splitinfer.actors.front_end.tracker import (
    Admission,
    Answer,
    AnswerMemory,
    JobTracker,
    PendingJob,
    redelivered_request_id,
)
from splitinfer.actors.front_end.watch import ServerWatch, route
from splitinfer.actors.model_pool.client import PoolClient, PoolError
from splitinfer.actors.monitors import NetworkMonitor, follow_links
from splitinfer.actors.registry.client import RegistryClient
from splitinfer.actors.transport import Stopped, Unroutable, first_line, header_str
from splitinfer.actors.transport.retry import ANSWER, LOST_INPUT_ERRORS, MAX_JOB_DELIVERIES, OUTAGE
from splitinfer.actors.transport.topology import (
    UNKEPT,
    Names,
    declare_kept_queue,
    escape_key,
    internal_reply_to,
    is_internal_key,
    key_problem,
)
from splitinfer.messages import (
    Deregister,
    ErrorResult,
    Heartbeat,
    HopReport,
    InferenceJob,
    MessageError,
    PlanTableMessage,
    Register,
    decode,
    decompress_array,
    encode,
    plan_deployment_name,
)
from splitinfer.messages.frames import RESULT, TENSORS, decode_frame, encode_frame, is_frame, unique_hops
from splitinfer.monitor.hops import HopWindow
from splitinfer.monitor.links import LinkEmulator
from splitinfer.planner import PlanTable
from splitinfer.splitter.manifest import Manifest

TICK_MAX_S = 0.25
POOL_TIMEOUT_S = 5.0  # a job waits at most this long for the pool to say what its deployment takes
UNROUTABLE_RETRY_S = 0.5  # a job whose live servers lost their queues (a broker node down) is sent again after this


def answers_alone(manifest: Manifest) -> bool:
    """One part produces every final output: it answers jobs itself (else the front end assembles the answer)."""
    return any(set(manifest.output_names) <= {o.name for o in p.outputs} for p in manifest.parts)


class FrontEnd(Actor):
    kind = "front_end"

    def __init__(self, actor_id: str = "front_end", settings=None, site: str = ""):
        # the front end's site is the client's: the job's inputs leave from it and its outputs come back to it
        super().__init__(actor_id, settings, site=site)
        self.links = LinkEmulator.from_settings(self.settings)
        self.pool = PoolClient(self.rpc, self.settings.pool_chunk_bytes)
        self.registry = RegistryClient(self.rpc)
        self.tracker = JobTracker()
        self.kept_answers = AnswerMemory(self.settings.answer_retention_s,
                                         int(self.settings.answer_retention_mb * 1024 * 1024))
        self.admission = Admission()
        self.manifests: dict[str, Manifest] = {}
        self.plans: dict[str, PlanTable] = {}           # model deployment -> its plan table
        self.servers = ServerWatch(self.settings.liveness_timeout_s)
        self._manifest_locks: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self.inbox = None
        self.hop_window = HopWindow()

    @property
    def inbox_name(self) -> str:
        return f"{self.names.ns}.front_end.{escape_key(self.id)}"

    @property
    def internal_reply_to(self) -> str:
        """Where parts send errors about the requests of the jobs this front end tracks (not to the caller): the
        front end turns such an error into the job's one answer."""
        return internal_reply_to(self.id)

    async def setup(self) -> None:
        assert self.channel is not None
        results, control = self.exchanges["results"], self.exchanges["control"]
        self.inbox = await self.channel.declare_queue(self.inbox_name, exclusive=True, auto_delete=True)
        await self.inbox.bind(results, routing_key=self.names.result_key(self.internal_reply_to))
        await self.inbox.bind(control, routing_key="error.*")  # errors any actor publishes that name no reply_to
        await self.consume(self.inbox, self.on_inbox)
        answers = await self.channel.declare_queue(f"{self.inbox_name}.answers", exclusive=True, auto_delete=True)
        await answers.bind(results, routing_key="#")
        await self.consume(answers, self.on_answer)
        inflight = await declare_kept_queue(self.channel, self.names, self.names.inflight, self.connection.policy)
        await inflight.bind(self.exchanges["submit"], routing_key=self.names.inflight)
        await self.consume(inflight, self.on_notice, prefetch=self.settings.max_inflight_jobs)
        jobs = await declare_kept_queue(self.channel, self.names, self.names.jobs, self.connection.policy)
        await self.consume(jobs, self.on_job, prefetch=self.settings.max_inflight_jobs)
        # heartbeats (who is down, who hosts what, the device's battery) and pushed plan tables
        watch = await self.channel.declare_queue(f"{self.inbox_name}.watch", exclusive=True, auto_delete=True)
        for key in ("register.*", "heartbeat.*", "deregister.*", "plans.*"):
            await watch.bind(control, routing_key=key)
        await self.consume(watch, self.on_watch)
        self.spawn(self._timer_loop(), name="deadlines")
        self.spawn(self._report_hops(), name="hop_report")
        self.connection.on_reconnect(self._resend_after_outage)
        await follow_links(self)  # SetLinks orders, network probes
        NetworkMonitor(self).start()
        self.log("serving", jobs=self.names.jobs, inflight=self.names.inflight, inbox=self.inbox_name)

    # ------------------------------------------------------------------ jobs the Client sent itself (notices)
    async def on_notice(self, message: AbstractIncomingMessage) -> None:
        """A Client sent a job's inputs to its parts: track the job's deadline (its retries are the Client's, which
        holds the inputs); answer `not_deployed` at once when nothing serves its deployment."""
        now = asyncio.get_running_loop().time()
        try:
            frame = decode_frame(message.body, self.settings.max_message_bytes)
        except MessageError as exc:
            await self.dead_letter(message, exc)
            return
        meta = frame.meta
        job_id = frame.job_id
        pending = self.tracker.pending.get(job_id)
        if pending is not None and message.redelivered:
            pending.ack = [message]  # our channel was lost and the broker handed it back: ack this one when answered
            return
        if self.tracker.another_attempt(job_id, frame.request_id) or self.tracker.is_answered(job_id):
            await self.deliveries.ack(message)  # a retry's notice, or its answer came first: nothing new to track
            return
        budget = meta.get("budget", self.settings.job_deadline_s)
        job = PendingJob(
            job_id=job_id, deployment=meta.get("model") or frame.deployment, reply_to=meta.get("rt") or job_id,
            inputs={}, final_outputs=[], received_at=now, deadline=now + budget, attempt_timeout_s=budget,
            ack=[message],
            first_request_id=frame.request_id if frame.request_id != job_id else None, route=frame.deployment,
            plan=meta.get("plan"), error_to=meta.get("err", ""))
        early = self.tracker.admit(job, now, retries=False)
        self.metrics.jobs.inc()
        if early is not None:
            await self._answer(early)
        elif not await self._served(frame.deployment):
            answer = self.tracker.on_error(job.request_id, "not_deployed",
                                           f"no live server serves deployment {frame.deployment} (load its parts)")
            if answer is not None:
                await self._answer(answer)
        else:
            self._wake.set()

    async def _served(self, deployment: str) -> bool:
        """Whether a live server hosts part of the deployment: the heartbeats say so, else the registry does (it
        hears a server's registration before the server answers a load order, so a job sent right after a deploy
        is not refused)."""
        if self.servers.hosted(deployment):
            return True
        try:
            return bool(await self.registry.who_hosts(deployment=deployment, timeout=POOL_TIMEOUT_S))
        except Exception as exc:  # no registry to ask: let the job run, its deadline bounds it
            self.log.warning("registry_unavailable", error=first_line(exc))
            return True

    # ------------------------------------------------------------------ jobs from the jobs queue
    async def on_job(self, message: AbstractIncomingMessage) -> None:
        now, received_wall = asyncio.get_running_loop().time(), time.time()
        try:
            job = self.decode(message, expect=InferenceJob)
        except MessageError as exc:
            await self.dead_letter(message, exc)
            return
        assert isinstance(job, InferenceJob)
        reply_to = job.reply_to or header_str(message, "reply_to") or job.job_id
        # an id that cannot become a routing key could never be answered: refused before any computation
        for value, what, code in ((job.job_id, "job id", "bad_job_id"), (reply_to, "reply_to", "bad_reply_to")):
            problem = key_problem(value, what)
            if problem is not None:
                await self._reject(message, job, reply_to, code, f"job {job.job_id[:64]}: {problem}")
                return
        if await self._seen_before(message, job, reply_to):
            return
        deliveries = self.tracker.count_delivery(job.job_id, _delivery_count(message))
        if deliveries > MAX_JOB_DELIVERIES:
            await self._reject(message, job, reply_to, "poison_job",
                               f"job {job.job_id} was delivered {deliveries} times without being answered")
            return
        manifest, problem = await self._manifest_within(job.deployment,
                                                        now + (job.deadline_s or self.settings.job_deadline_s))
        if manifest is None:
            await self._reject(message, job, reply_to, *problem)
            return
        bad = manifest.check_inputs(job.inputs)
        if bad is not None:
            await self._reject(message, job, reply_to, bad[0], f"deployment {job.deployment}: {bad[1]}")
            return
        to, plan_id, problem = route(job.deployment, self.plans.get(job.deployment), job.requirements, self.servers)
        if problem is not None:
            await self._reject(message, job, reply_to, *problem)
            return
        deadline_s = job.deadline_s or self.settings.job_deadline_s
        # time already spent since submission (queueing) counts against the deadline; a clock ahead of ours
        # (submitted_at in the future) does not extend it
        remaining = min(deadline_s, job.submitted_at + deadline_s - received_wall)
        refusal = self.admission.refusal(job.deployment, remaining, now) if remaining > 0 else None
        if refusal is not None:  # it cannot finish in time: answered now, the pipeline keeps to jobs that can
            await self._reject(message, job, reply_to, "deadline_exceeded", f"job {job.job_id}: {refusal}",
                               dead_letter=False)
            return
        pending = PendingJob(
            job_id=job.job_id, deployment=job.deployment, reply_to=reply_to, inputs=dict(job.inputs),
            final_outputs=manifest.output_names, received_at=now, deadline=now + remaining,
            attempt_timeout_s=max(0.05, deadline_s * self.tracker.retry_share), ack=[message],
            first_request_id=redelivered_request_id(job.job_id) if message.redelivered else None,
            route=to, plan=plan_id, requirements=job.requirements, error_to=self.internal_reply_to,
            generation=self.connection.reconnects)
        # the first hop: the job's trip from the submitter to here (clocks of one machine; across machines it
        # includes their offset, so it is clamped at 0)
        pending.timings["(job)"] = [["job", self.id, max(0.0, received_wall - job.submitted_at), 0.0, 0.0, 0.0, 1,
                                     received_wall, "broker"]]
        early = self.tracker.admit(pending, now)
        self.metrics.jobs.inc()
        if early is not None:
            await self._answer(early)
            return
        self.admission.sent(job.deployment)
        await self._send_inputs(pending)
        self._wake.set()

    async def _manifest_within(self, deployment: str, until: float):
        """`manifest`, asking again while the pool does not answer (it may be restarting, or reconnecting after
        the broker did) until `until`: a job is not refused for a pause of the control plane."""
        loop = asyncio.get_running_loop()
        for failures in range(1, OUTAGE.attempts + 1):
            manifest, problem = await self.manifest(deployment)
            if manifest is not None or problem[0] != "pool_unavailable" or self.stopping \
                    or loop.time() + OUTAGE.delay(failures) >= until:
                return manifest, problem
            await asyncio.sleep(OUTAGE.delay(failures))
        return manifest, problem

    async def _seen_before(self, message: AbstractIncomingMessage, job: InferenceJob, reply_to: str) -> bool:
        """A job id this front end runs or answered: never computed twice, never left unanswered.
        - running, handed back by the broker (our channel was lost: a broker restart): this delivery is the one to
          ack; the inputs already went out again when the connection came back (`_resend_after_outage`);
        - running, submitted again: acked, and the answer goes to this submission's reply_to too;
        - answered, submitted again: its kept answer again (else, past the retention, it runs as a new job);
        - answered, handed back by the broker: acked (its answer went out before the channel was lost)."""
        pending = self.tracker.pending.get(job.job_id)
        if pending is not None:
            if message.redelivered or pending.generation != self.connection.reconnects:
                pending.ack = [message]
                pending.generation = self.connection.reconnects
            else:
                if reply_to != pending.reply_to and reply_to not in pending.also_reply:
                    pending.also_reply.append(reply_to)
                self.log("job_joined", job_id=job.job_id, reply_to=reply_to)
                await self.deliveries.ack(message)
            return True
        if not self.tracker.is_answered(job.job_id):
            return False
        if message.redelivered:
            await self.deliveries.ack(message)
            return True
        kept = self.kept_answers.get(job.job_id)
        if kept is None:
            self.tracker.forget(job.job_id)  # its answer is no longer kept: run it again
            return False
        try:
            await self.publisher.publish("results", self.names.result_key(reply_to), kept, mandatory=False,
                                         headers={"job_id": job.job_id, UNKEPT: True}, backoff=ANSWER)
        except Exception as exc:
            self.log.error("answer_again_failed", job_id=job.job_id, error=first_line(exc))
            await self.to_dead_letters(message, "answer_failed", f"the kept answer could not be sent: "
                                                                 f"{first_line(exc)}")
            return True
        self.log("job_answered_again", job_id=job.job_id, reply_to=reply_to)
        await self.deliveries.ack(message)
        return True

    async def _reject(self, message: AbstractIncomingMessage, job: InferenceJob, reply_to: str, code: str,
                      reason: str, *, dead_letter: bool = True) -> None:
        """A job that cannot run: one error answer (where its ids can route), then the job goes to the dead-letter
        queue with the reason, and the same id submitted again gets the same answer. `dead_letter=False`: it was
        fine, only too late (admission): acked, and the same id may be tried again."""
        if dead_letter and key_problem(job.job_id, "job id") is None:
            self.tracker.forget(job.job_id)
            self.tracker.answered[job.job_id] = None
        await self.publish_error(job.job_id, code, reason, reply_to=reply_to, deployment=job.deployment,
                                 headers=None if dead_letter else {UNKEPT: True})
        self.stats["errors"] += 1
        self.log.warning("job_rejected", job_id=job.job_id[:200], code=code, reason=reason)
        if dead_letter:
            await self.to_dead_letters(message, code, reason)
        else:
            await self.deliveries.ack(message)

    async def _send_again_later(self, job: PendingJob, request_id: str) -> None:
        await asyncio.sleep(UNROUTABLE_RETRY_S)
        if self.tracker.pending.get(job.job_id) is job and job.request_id == request_id and not job.outputs:
            await self._send_inputs(job)

    async def _send_inputs(self, job: PendingJob) -> None:
        """The job's inputs as one frame each to `<ns>.tensors`, under the attempt's request id."""
        rid = job.request_id
        to = job.route or job.deployment
        meta = {"rid": rid, "job": job.job_id, "dep": to, "srv": self.id, "site": self.site, "origin": self.site,
                "rt": job.reply_to,
                "err": job.error_to or self.internal_reply_to, "sent": time.time(),
                "budget": max(0.0, job.deadline - asyncio.get_running_loop().time()),
                "hops": [h for hops in job.timings.values() for h in hops]}
        if job.plan is not None:
            meta.update(model=job.deployment, plan=job.plan)
        headers = {"request_id": rid, "reply_to": meta["err"]}
        sends = [self.publisher.publish("tensors", self.names.tensor_key(to, name),
                                        encode_frame(TENSORS, meta, {name: arr}), headers=headers)
                 for name, arr in job.inputs.items()]
        results = await asyncio.gather(*sends, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            exc = failed[0]
            if not self.connection.is_open:  # the broker is away: sent again when the connection is back
                self.log.warning("job_send_deferred", job_id=job.job_id, error=first_line(exc))
                return
            if isinstance(exc, Unroutable) and self.servers.hosted(to) is True and \
                    job.deadline - asyncio.get_running_loop().time() > UNROUTABLE_RETRY_S:
                # live servers host it: their queues are being declared again (a broker node went down)
                self.log.warning("job_send_deferred", job_id=job.job_id, error=first_line(exc))
                self.spawn(self._send_again_later(job, rid))
                return
            if isinstance(exc, Unroutable):
                code, reason = "not_deployed", f"no server serves an input of deployment {to} (load its parts first)"
            else:
                code, reason = "publish_failed", f"could not send the inputs: {first_line(exc)}"
            answer = self.tracker.on_error(rid, code, reason)
            if answer is not None:
                await self._answer(answer)
        else:
            job.attempt_sent = asyncio.get_running_loop().time()
            self.log("job_sent", job_id=job.job_id, request_id=rid, attempt=job.attempt, route=to)

    # ------------------------------------------------------------------ answers, errors, assembled outputs
    async def on_answer(self, message: AbstractIncomingMessage) -> None:
        """Every answer on `<ns>.results`: a tracked job is answered, its deliveries are acked."""
        await self.deliveries.ack(message)  # exclusive queue: the answer itself is kept by the result store
        if is_internal_key(message.routing_key):
            return  # a part's error for us: the inbox takes it
        job_id, hops = _answer_of(message.body, self.settings.max_message_bytes)
        if job_id is None or (message.headers or {}).get(UNKEPT):
            return
        self.kept_answers.keep(job_id, message.body)
        answer = self.tracker.on_answered(job_id)
        if answer is not None:
            await self._settle(answer, hops)

    async def on_inbox(self, message: AbstractIncomingMessage) -> None:
        await self.deliveries.ack(message)  # exclusive queue: nothing to hand back if we die; the job is still unacked
        if message.exchange == self.names.tensors:
            await self._on_final_output(message)
            return
        if (message.routing_key or "") == self.names.error_key(self.id):
            return
        try:
            err = decode(message.body, max_bytes=self.settings.max_message_bytes, expect=ErrorResult)
        except MessageError:
            return
        if err.job_id:
            answer = self.tracker.on_error(err.job_id, err.code, f"{err.message} (at {err.where})")
            if answer is not None:
                await self._answer(answer)
                return
            self._wake.set()  # a job whose tensors were lost goes again now (the timer loop sends it)
            sender = self.tracker.sender_resends(err.job_id) if err.code in LOST_INPUT_ERRORS else None
            if sender is not None:  # a Client's job: the Client holds the inputs; it sends them again when told
                with contextlib.suppress(Exception):  # untold, it sends them again after a share of the deadline
                    await self.publisher.publish(
                        "results", self.names.result_key(internal_reply_to(sender.reply_to)), encode(err),
                        mandatory=False)

    async def _on_final_output(self, message: AbstractIncomingMessage) -> None:
        """A final output of a deployment whose outputs leave from several parts: part of an answer to assemble."""
        try:
            frame = decode_frame(message.body, self.settings.max_message_bytes)
        except MessageError as exc:
            self.log.warning("bad_output", error=exc.reason, key=message.routing_key)
            return
        manifest = self.manifests.get(frame.deployment)
        dtypes = {t.name: t.dtype for t in manifest.outputs} if manifest else {}
        for name, array in frame.arrays.items():
            if name in frame.codecs:
                codec, scale = frame.codecs[name]
                try:
                    array = decompress_array(array, codec, scale, dtypes.get(name, "float32"))
                except MessageError as exc:
                    answer = self.tracker.on_error(frame.request_id, exc.code, f"{name}: {exc.reason}")
                    if answer is not None:
                        await self._answer(answer)
                    return
            answer = self.tracker.on_output(frame.request_id, name, array, frame.hops, frame.meta.get("srv"))
            if answer is not None:
                await self._answer(answer)

    async def _answer(self, answer: Answer) -> None:
        """Publish what the front end must answer itself (an error, an assembled result), then settle the job."""
        job = answer.job
        key = self.names.result_key(job.reply_to or job.job_id)
        try:
            if answer.kind == "result":
                hops = unique_hops(job.timings.values())
                meta = {"rid": job.request_id, "job": job.job_id, "dep": job.route or job.deployment,
                        "srv": self.id, "site": self.site, "sent": time.time(), "hops": [list(h) for h in hops]}
                if job.plan is not None:
                    meta.update(model=job.deployment, plan=job.plan)
                body = encode_frame(RESULT, meta, job.outputs)
                await self.publisher.publish("results", key, body, mandatory=False, backoff=ANSWER)
            elif answer.kind == "error":
                body = await self.publish_error(job.job_id, answer.code or "error", answer.message or "",
                                                reply_to=job.reply_to, deployment=job.deployment, plan=job.plan)
                if body is None:
                    raise ConnectionError("the error answer was not confirmed")
            if answer.kind != "answered":  # kept at once: submissions that joined the job get it in _settle
                self.kept_answers.keep(job.job_id, body)
        except Exception as exc:
            if not self.connection.is_open:
                # the broker is away: it hands the job back when we reconnect, and it runs again then
                self.log.warning("answer_deferred", job_id=job.job_id, error=first_line(exc))
                self.tracker.forget(job.job_id)
                return
            # the broker refuses this answer: trying the job again would loop; to the dead letters, with why
            self.log.error("answer_failed", job_id=job.job_id, error=first_line(exc))
            for m in job.ack:
                await self.to_dead_letters(m, "answer_failed", f"its answer could not be published: "
                                                               f"{first_line(exc)}")
            return
        await self._settle(answer)

    async def _settle(self, answer: Answer, hops: list | None = None) -> None:
        """The job is answered: ack its deliveries, send its answer to the submissions that joined it meanwhile,
        and keep its hop timings (`hops`: those of an answer a part published itself) for the cost model."""
        job = answer.job
        now = asyncio.get_running_loop().time()
        if answer.kind != "error":
            if hops is None:
                hops = unique_hops(job.timings.values())
            self.hop_window.add(job.route or job.deployment, hops, answer.latency_s)
        if answer.kind == "error":
            self.stats["errors"] += 1
        else:
            self.stats["processed"] += 1
        self.metrics.answers.labels(code=answer.code or "ok").inc()
        if answer.code == "deadline_exceeded":
            self.metrics.deadline_misses.inc()
        if answer.kind != "error":
            self.metrics.job_latency.observe(answer.latency_s)
            self.metrics.plan_jobs.labels(deployment=job.deployment, plan=job.plan or job.route or "-").inc()
        if job.resend:
            self.admission.done(job.deployment, answer.latency_s if answer.kind != "error" else None, now)
        self.log("job_answered", job_id=job.job_id, kind=answer.kind, code=answer.code,
                 latency_ms=round(answer.latency_s * 1e3, 2), attempts=job.attempt + 1)
        kept = self.kept_answers.get(job.job_id) if job.also_reply else None
        for reply_to in job.also_reply if kept is not None else ():
            with contextlib.suppress(Exception):
                await self.publisher.publish("results", self.names.result_key(reply_to), kept, mandatory=False,
                                             headers={"job_id": job.job_id, UNKEPT: True}, backoff=ANSWER)
        for m in job.ack:
            await self.deliveries.ack(m)

    async def _resend_after_outage(self) -> None:
        """The connection is back: tensors in flight were transient and may be gone with the broker, so every job
        this front end sends itself goes out again now, not at its retry time (its deliveries come back too)."""
        self.servers.reheard()
        now = asyncio.get_running_loop().time()
        jobs = self.tracker.retry_all_now(now, sent_before=self.connection.lost_at)
        if jobs:
            self.log.warning("jobs_resent_after_outage", jobs=len(jobs), reconnects=self.connection.reconnects)
            self.metrics.retries.inc(len(jobs))
        for job in jobs:
            await self._send_inputs(job)

    # ------------------------------------------------------------------ deadlines and retries
    async def _report_hops(self) -> None:
        """The recent hop timings and latencies to the state pool, for the optimizer's cost model to learn from."""
        while not self.stopping and self.settings.hop_report_interval_s > 0:
            await asyncio.sleep(self.settings.hop_report_interval_s)
            hops, latencies = self.hop_window.summary()
            if not hops and not latencies:
                continue
            with contextlib.suppress(Exception):  # the next report carries the same window
                await self.publisher.publish("control", Names.HOP_STATE,
                                             HopReport(source=self.id, hops=hops, latencies=latencies),
                                             mandatory=False)

    async def _timer_loop(self) -> None:
        while not self.stopping:
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(TICK_MAX_S, self.tracker.next_wakeup(
                    asyncio.get_running_loop().time())))
            now = asyncio.get_running_loop().time()
            retries, answers = self.tracker.tick(now, lambda dep: self.admission.expected(dep, now))
            for answer in answers:
                await self._answer(answer)
            for job in retries:
                if job.plan is not None and job.deployment in self.plans:  # the best plan may have changed
                    to, plan_id, problem = route(job.deployment, self.plans.get(job.deployment), job.requirements,
                                                 self.servers)
                    if problem is None:
                        job.route, job.plan = to, plan_id
                self.log.warning("job_retry", job_id=job.job_id, request_id=job.request_id, route=job.route)
                self.metrics.retries.inc()
                await self._send_inputs(job)

    # ------------------------------------------------------------------ manifests from the model pool
    async def manifest(self, deployment: str) -> tuple[Manifest | None, tuple[str, str] | None]:
        """(manifest, None) or (None, (code, reason))."""
        if deployment in self.manifests:
            return self.manifests[deployment], None
        lock = self._manifest_locks.setdefault(deployment, asyncio.Lock())
        async with lock:
            if deployment in self.manifests:
                return self.manifests[deployment], None
            try:
                listing = await self.pool.listing(timeout=POOL_TIMEOUT_S)
                if deployment in listing.models:
                    return await self._load_model(deployment)
                if deployment not in listing.deployments:
                    return None, ("unknown_deployment", f"no deployment {deployment!r} in the model pool (it has: "
                                                        f"{', '.join(listing.models + listing.deployments) or 'none'})")
                manifest = await self.pool.manifest(deployment, timeout=POOL_TIMEOUT_S)
            except (asyncio.TimeoutError, TimeoutError):
                return None, ("pool_unavailable", "the model pool did not answer; is `splitinfer up` running?")
            except (Stopped, MessageError) as exc:
                return None, ("pool_unavailable", str(exc))
            except PoolError as exc:
                return None, ("unknown_deployment", f"no deployment {deployment!r} in the model pool ({exc})")
            except ValueError as exc:
                return None, ("bad_manifest", f"deployment {deployment}: {first_line(exc)}")
            await self._listen(deployment, manifest)
            return manifest, None

    async def _listen(self, deployment: str, manifest: Manifest) -> None:
        """Know the deployment; when its final outputs leave from several parts, take them in to assemble."""
        assert self.inbox is not None
        if not answers_alone(manifest):
            for name in manifest.output_names:
                await self.inbox.bind(self.exchanges["tensors"], routing_key=self.names.tensor_key(deployment, name))
        self.manifests[deployment] = manifest
        self.log("deployment_known", deployment=deployment, inputs=[t.name for t in manifest.inputs],
                 outputs=manifest.output_names, assembled_here=not answers_alone(manifest))

    async def _load_model(self, model: str) -> tuple[Manifest | None, tuple[str, str] | None]:
        """A model deployment: its plan table, and every plan's manifest (all plans take and give the same tensors;
        the first one's validates the jobs). Called under the model's manifest lock."""
        doc = await self.pool.plan_table(model)
        if doc is None or not doc.table:
            return None, ("unknown_deployment", f"no plan table for {model!r} in the model pool")
        table = PlanTable.from_json(doc.table)
        first = None
        for plan in table.plans:
            dep = plan_deployment_name(model, plan.id)
            try:
                manifest = await self.pool.manifest(dep, timeout=POOL_TIMEOUT_S)
            except PoolError as exc:
                return None, ("unknown_deployment", f"plan {plan.id} of {model}: {exc}")
            await self._listen(dep, manifest)
            first = first or manifest
        if first is None:
            return None, ("unknown_deployment", f"the plan table of {model!r} is empty")
        self.plans[model] = table
        self.manifests[model] = first
        self.log("model_known", model=model, plans=[f"{p.id}: {p.describe()}" for p in table.plans])
        return first, None

    # ------------------------------------------------------------------ servers' state and plan tables
    async def on_watch(self, message: AbstractIncomingMessage) -> None:
        await self.deliveries.ack(message)  # exclusive queue: state is refreshed by the next message anyway
        try:
            msg = decode(message.body, max_bytes=self.settings.max_message_bytes,
                         expect=(Register, Heartbeat, Deregister, PlanTableMessage))
        except MessageError as exc:
            self.log.warning("bad_control", error=exc.reason)
            return
        if isinstance(msg, Heartbeat):
            self.servers.heartbeat(msg.actor_id, msg.state, parts=msg.parts)
        elif isinstance(msg, Register):
            self.servers.registered(msg.actor_id, msg.parts)
        elif isinstance(msg, Deregister):
            self.servers.deregister(msg.actor_id)
        elif msg.name in self.plans:
            self._update_plans(msg)

    def _update_plans(self, msg: PlanTableMessage) -> None:
        """New predictions for a known model: take them; different plans (a redeploy) or none (undeployed): forget
        the model, so the next job loads it again."""
        try:
            table = PlanTable.from_json(msg.table) if msg.table and not msg.removed else None
        except (ValueError, KeyError, TypeError) as exc:
            self.log.warning("bad_plan_table", model=msg.name, error=first_line(exc))
            return
        old = self.plans.get(msg.name)
        if table is not None and old is not None and [p.id for p in table.plans] == [p.id for p in old.plans] \
                and [p.key() for p in table.plans] == [p.key() for p in old.plans]:
            self.plans[msg.name] = table
            return
        self.plans.pop(msg.name, None)
        self.manifests.pop(msg.name, None)


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """Deliveries before this one as the broker counts them (quorum queues: `x-delivery-count`), else 0."""
    count = (message.headers or {}).get("x-delivery-count")
    return int(count) + 1 if isinstance(count, int) else 0


def _answer_of(body: bytes, max_bytes: int) -> tuple[str | None, list]:
    """The job an answer on `<ns>.results` is for (a result frame or an ErrorResult; None if it names none) and
    the hops a result carries."""
    try:
        if is_frame(body):
            frame = decode_frame(body, max_bytes)
            return frame.job_id, list(frame.hops or [])
        msg = decode(body, max_bytes=max_bytes, expect=ErrorResult)
        return msg.job_id, []
    except MessageError:
        return None, []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m splitinfer.actors.front_end", description=__doc__.splitlines()[0])
    parser.add_argument("--id", default="front_end")
    parser.add_argument("--site", default="", help="the client's site (link emulation, network monitor)")
    args = parser.parse_args(argv)
    run_actor(FrontEnd(args.id, site=args.site))

