"""The front end actor: inference jobs in, one answer per job out.

Flow: consume `<ns>.jobs`, validate the job against the deployment's manifest (for a model deployment, choose the
plan from its plan table by the job's requirements, the device's battery and which servers heartbeat), publish
its input tensors to `<ns>.tensors` (key `<deployment>.<tensor>`, header request_id), collect the final outputs on
a queue of its own bound to the final tensors' keys, and publish one ResultMessage (outputs + per-hop timings) or
one ErrorResult to `<ns>.results` with routing key reply_to. The bookkeeping is `tracker.JobTracker`.

    python -m splitinfer.actors.front_end [--id front_end] [--site SITE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

from aio_pika.abc import AbstractIncomingMessage

from splitinfer.actors.actor import Actor, run_actor
from splitinfer.actors.front_end.tracker import Answer, JobTracker, PendingJob, redelivered_request_id
from splitinfer.actors.front_end.watch import ServerWatch
from splitinfer.actors.model_pool.client import PoolClient, PoolError
from splitinfer.actors.monitors import NetworkMonitor, follow_links
from splitinfer.actors.transport import Stopped, Unroutable, first_line, header_str
from splitinfer.actors.transport.topology import INTERNAL_REPLY_PREFIX, escape_key, queue_arguments
from splitinfer.messages import (
    Deregister,
    ErrorResult,
    Heartbeat,
    Hop,
    InferenceJob,
    MessageError,
    PlanTableMessage,
    Requirements,
    ResultMessage,
    TensorMessage,
    check_tensor,
    decode,
    decompress_array,
    plan_deployment_name,
)
from splitinfer.monitor.links import LinkEmulator
from splitinfer.planner import PlanError, PlanTable, choose_plan
from splitinfer.splitter.manifest import Manifest

TICK_MAX_S = 0.25
POOL_TIMEOUT_S = 5.0  # a job waits at most this long for the pool to say what its deployment takes


class FrontEnd(Actor):
    """Consumes `<ns>.jobs`; answers each job once on `<ns>.results` (key reply_to or job id)."""

    kind = "front_end"

    def __init__(self, actor_id: str = "front_end", settings=None, site: str = ""):
        # the front end's site is the client's: the job's inputs leave from it and its outputs come back to it
        super().__init__(actor_id, settings, site=site)
        self.links = LinkEmulator.from_settings(self.settings)
        self.pool = PoolClient(self.rpc, self.settings.pool_chunk_bytes)
        self.tracker = JobTracker()
        self.manifests: dict[str, Manifest] = {}
        self.plans: dict[str, PlanTable] = {}           # model deployment -> its plan table
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
        user), and the front end turns it into the job's one answer."""
        return f"{INTERNAL_REPLY_PREFIX}{self.id}"

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
        await follow_links(self)  # SetLinks orders, network probes
        NetworkMonitor(self).start()
        self.log("serving", jobs=self.names.jobs, inbox=self.inbox_name)

    # ------------------------------------------------------------------ jobs in
    async def on_job(self, message: AbstractIncomingMessage) -> None:
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
                await self.deliveries.ack(message)
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
        pending.timings["(job)"] = [Hop(part="job", server=self.id,
                                        transfer_s=max(0.0, received_wall - job.submitted_at),
                                        finished_at=received_wall)]
        early = self.tracker.admit(pending, received)
        if early is not None:
            await self._answer(early)
            return
        await self._send_inputs(pending)
        self._wake.set()

    def _route(self, deployment: str, requirements: Requirements) -> tuple[str, str | None, tuple[str, str] | None]:
        """(deployment to send to, plan id, None) or (.., .., (code, reason)). A model deployment's plan comes from
        its table by the job's requirements, with the device's reported battery when the job gives none, avoiding
        servers that stopped heartbeating (the fallback when a server of the best plan is down)."""
        table = self.plans.get(deployment)
        if table is None:
            return deployment, None, None
        battery = requirements.battery if requirements.battery is not None else self.servers.battery(table.client)
        try:
            plan = choose_plan(table, requirements.max_latency_s, battery, requirements.min_fidelity,
                               self.servers.down(table.servers))
        except PlanError as exc:
            return deployment, None, ("no_plan", str(exc))
        return plan_deployment_name(deployment, plan.id), plan.id, None

    def _check_inputs(self, job: InferenceJob, manifest: Manifest) -> tuple[str, str] | None:
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

    async def _reject(self, message: AbstractIncomingMessage, job: InferenceJob, reply_to: str, code: str,
                      reason: str) -> None:
        """A job that cannot run: one error answer, then the job goes to the dead-letter queue."""
        self.tracker.answered[job.job_id] = None
        await self.publish_error(job.job_id, code, reason, reply_to=reply_to, deployment=job.deployment)
        self.stats["errors"] += 1
        self.log.warning("job_rejected", job_id=job.job_id, code=code, reason=reason)
        await self.deliveries.reject(message)

    async def _send_inputs(self, job: PendingJob) -> None:
        rid = job.request_id
        route = job.route or job.deployment
        wall_deadline = time.time() + max(0.0, job.deadline - time.monotonic())
        sends = [
            self.publisher.publish(
                "tensors", self.names.tensor_key(route, name),
                TensorMessage(request_id=rid, deployment=route, tensor=name, array=arr, server=self.id,
                              deadline=wall_deadline, reply_to=self.internal_reply_to, site=self.site),
                headers={"request_id": rid, "reply_to": self.internal_reply_to})
            for name, arr in job.inputs.items()
        ]
        results = await asyncio.gather(*sends, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            exc = failed[0]
            if isinstance(exc, Unroutable):
                code, reason = "not_deployed", f"no server serves an input of deployment {route} (load its parts first)"
            else:
                code, reason = "publish_failed", f"could not send the inputs: {first_line(exc)}"
            answer = self.tracker.on_error(rid, code, reason)
            if answer is not None:
                await self._answer(answer)
        else:
            self.log("job_sent", job_id=job.job_id, request_id=rid, attempt=job.attempt, route=route)

    # ------------------------------------------------------------------ outputs and errors back
    async def on_inbox(self, message: AbstractIncomingMessage) -> None:
        await self.deliveries.ack(message)  # exclusive queue: nothing to hand back if we die; the job is still unacked
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
        array = msg.array
        if msg.codec is not None:  # a plan that sends the final output compressed: the user gets the model's dtype
            manifest = self.manifests.get(msg.deployment)
            dtype = next((t.dtype for t in manifest.outputs if t.name == msg.tensor), "float32") if manifest \
                else "float32"
            try:
                array = decompress_array(msg.array, msg.codec, msg.scale, dtype)
            except MessageError as exc:
                answer = self.tracker.on_error(msg.request_id, exc.code, f"{msg.tensor}: {exc.reason}")
                if answer is not None:
                    await self._answer(answer)
                return
        received = time.time()
        hops = [*msg.hops, Hop(part="result", server=self.id, transfer_s=max(0.0, received - msg.sent_at),
                               finished_at=received)]
        answer = self.tracker.on_output(msg.request_id, msg.tensor, array, hops, msg.server or None)
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
                await self.publisher.publish("results", key, msg, mandatory=False)
            elif publish:
                await self.publish_error(job.job_id, answer.code or "error", answer.message or "",
                                         reply_to=job.reply_to, deployment=job.deployment, plan=job.plan)
        except Exception as exc:  # the answer could not be confirmed: hand the job back for a new try
            self.log.error("answer_failed", job_id=job.job_id, error=first_line(exc))
            self.tracker.answered.pop(job.job_id, None)
            if job.ack is not None:
                await self.deliveries.requeue(job.ack)
            return
        if answer.kind == "result":
            self.stats["processed"] += 1
        else:
            self.stats["errors"] += 1
        self.log("job_answered", job_id=job.job_id, kind=answer.kind, code=answer.code,
                 latency_ms=round(answer.latency_s * 1e3, 2), attempts=job.attempt + 1)
        if job.ack is not None:
            await self.deliveries.ack(job.ack)

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
        assert self.inbox is not None
        for name in manifest.output_names:
            await self.inbox.bind(self.exchanges["tensors"], routing_key=self.names.tensor_key(deployment, name))
        self.manifests[deployment] = manifest
        self.log("deployment_known", deployment=deployment, inputs=[t.name for t in manifest.inputs],
                 outputs=manifest.output_names)

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
    parser = argparse.ArgumentParser(prog="python -m splitinfer.actors.front_end", description=__doc__.splitlines()[0])
    parser.add_argument("--id", default="front_end")
    parser.add_argument("--site", default="", help="the client's site (link emulation, network monitor)")
    args = parser.parse_args(argv)
    run_actor(FrontEnd(args.id, site=args.site))
