"""The front end's bookkeeping of jobs, pure and synchronous so it can be reasoned about and tested on its own.

- each attempt of a job runs under its own request id (`<job_id>` for the first, `<job_id>~<n>` after; a job the
  broker redelivers after a front-end crash starts at `<job_id>~r<random>`), so a model server's memory of served
  requests never swallows a retry;
- a job past its deadline is answered with a `deadline_exceeded` error, also one that was already late on arrival;
- if an attempt produced nothing after a share of the deadline (retry.JOB_RETRY_SHARE), it is re-sent under a new
  request id (at most retry.JOB_RETRIES times) while the deadline still allows it;
- the answer usually comes from the part that produces it, straight to the caller: the tracker only hears of it
  (`on_answered`) and stops tracking; it builds a result itself only for a deployment whose final outputs leave
  from several parts (`on_output`), and answers errors and deadlines (a deadline once its grace has passed too, so
  a late answer on its way is not contradicted);
- the first complete result or error wins; whatever arrives for an answered job is dropped (bounded memory);
- an answered job's answer is kept for a while (`AnswerMemory`, bounded in bytes and age), so a job id submitted
  again gets that answer again; a job delivered over and over without an answer is poison (`count_delivery`);
- the latencies of recent answers per deployment (`Admission`) tell whether a job's remaining deadline can still
  be met.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from splitinfer.actors.transport.retry import DEADLINE_GRACE_S, JOB_RETRIES, JOB_RETRY_SHARE, LOST_INPUT_ERRORS

RETRY_SEP = "~"
ANSWERED_MEMORY = 10_000


def attempt_request_id(job_id: str, attempt: int, first: str | None = None) -> str:
    if attempt == 0:
        return first or job_id
    return f"{job_id}{RETRY_SEP}{attempt}"


def redelivered_request_id(job_id: str) -> str:
    """First request id for a job redelivered to a (restarted) front end: the crashed one may have used job_id and
    job_id~1 already, and servers drop request ids they have served."""
    return f"{job_id}{RETRY_SEP}r{uuid.uuid4().hex[:8]}"


@dataclass
class PendingJob:
    job_id: str
    deployment: str
    reply_to: str
    inputs: dict[str, Any]        # what a retry sends again: arrays (a job from the jobs queue) or input frames
    final_outputs: list[str]
    received_at: float            # monotonic
    deadline: float               # monotonic
    attempt_timeout_s: float
    attempt: int = 0
    attempt_started: float = 0.0
    attempt_sent: float = 0.0     # when the attempt's inputs were confirmed sent (None yet: 0)
    first_request_id: str | None = None  # set for a redelivered job (see redelivered_request_id)
    route: str = ""               # the deployment the inputs go to: `deployment`, or its chosen plan's
    plan: str | None = None       # the chosen plan's id, when `deployment` is a model with a plan table
    requirements: Any = None      # the job's Requirements (a retry chooses its plan again)
    outputs: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, list] = field(default_factory=dict)   # tensor -> hops that produced it
    served_by: list[str] = field(default_factory=list)
    ack: list = field(default_factory=list)  # the deliveries to ack once the job is answered
    error_to: str = ""            # where the parts send errors about this job
    resend: bool = True           # the tracker re-sends it (else its sender does, and says so: another_attempt)
    requests: list[str] = field(default_factory=list)  # request ids of attempts its sender made
    also_reply: list[str] = field(default_factory=list)  # reply_to of the same job id submitted again meanwhile
    generation: int = 0           # the connection (its reconnect count) its deliveries came on
    lost: bool = False            # its attempt's tensors were lost (LOST_INPUT_ERRORS): re-send it at once
    last_error: str = ""          # the last such error, for the deadline's message

    @property
    def request_id(self) -> str:
        return attempt_request_id(self.job_id, self.attempt, self.first_request_id)


@dataclass
class Answer:
    """What the transport must publish for a job: a result (outputs) or an error."""

    job: PendingJob
    kind: str                     # "result" | "error" to publish, or "answered": published by a part already
    code: str | None = None
    message: str | None = None
    latency_s: float = 0.0


class JobTracker:
    def __init__(self, max_retries: int = JOB_RETRIES, retry_share: float = JOB_RETRY_SHARE,
                 grace_s: float = DEADLINE_GRACE_S):
        self.max_retries = max_retries
        self.retry_share = retry_share
        self.grace_s = grace_s
        self.pending: dict[str, PendingJob] = {}        # job_id -> job
        self.by_request: dict[str, str] = {}            # request id of every attempt of a pending job -> job_id
        self.answered: OrderedDict[str, None] = OrderedDict()
        self.deliveries: OrderedDict[str, int] = OrderedDict()  # job id -> times delivered while unanswered

    # -- intake
    def is_answered(self, job_id: str) -> bool:
        return job_id in self.answered

    def admit(self, job: PendingJob, now: float | None = None, retries: bool = True) -> Answer | None:
        """Register a job; an Answer (error) if it cannot run: already answered, duplicate or already late.
        `retries=False`: its sender re-sends it (a Client's job): track its deadline only."""
        now = time.monotonic() if now is None else now
        if job.job_id in self.answered or job.job_id in self.pending:
            return Answer(job, "error", "duplicate_job", f"job {job.job_id} was already submitted")
        if now >= job.deadline:
            return self._finish(job, Answer(job, "error", "deadline_exceeded",
                                            f"job {job.job_id} reached the front end after its deadline"), now)
        job.attempt_started = now
        job.resend = retries
        self.pending[job.job_id] = job
        self.by_request[job.request_id] = job.job_id
        return None

    def another_attempt(self, job_id: str, request_id: str) -> bool:
        """The sender of a job it re-sends itself tried again under `request_id`: that attempt's errors are now the
        job's (and no longer the earlier attempts'). False when the job is not tracked."""
        job = self.pending.get(job_id)
        if job is None:
            return False
        job.requests.append(request_id)
        self.by_request[request_id] = job_id
        return True

    def _job_of(self, request_id: str) -> PendingJob | None:
        """The pending job a request id belongs to, any attempt (a late first attempt's output is the same work)."""
        job_id = self.by_request.get(request_id)
        return None if job_id is None else self.pending.get(job_id)

    def sender_resends(self, request_id: str) -> PendingJob | None:
        """The pending job whose latest request this is, when its sender holds the inputs and sends them again
        itself (a Client's job): the one to tell when that attempt's inputs were lost."""
        job = self._job_of(request_id)
        if job is None or job.resend or request_id != self._latest_request(job):
            return None
        return job

    @staticmethod
    def _latest_request(job: PendingJob) -> str:
        return job.requests[-1] if job.requests else job.request_id

    def count_delivery(self, job_id: str, at_least: int = 0) -> int:
        """One more delivery of an unanswered job (at least `at_least`, e.g. a quorum queue's delivery count):
        how many so far."""
        n = max(self.deliveries.get(job_id, 0) + 1, at_least)
        self.deliveries[job_id] = n
        self.deliveries.move_to_end(job_id)
        while len(self.deliveries) > ANSWERED_MEMORY:
            self.deliveries.popitem(last=False)
        return n

    def forget(self, job_id: str) -> None:
        """An answered job whose answer is no longer kept: its id may run again as a new job."""
        self.answered.pop(job_id, None)

    def retry_now(self, job_id: str, now: float | None = None, sent_before: float | None = None
                  ) -> PendingJob | None:
        """Start the job's next attempt now (its tensors were lost with the broker's transient messages), whatever
        its retry budget: it is not a slow attempt. None if it is not pending, its sender re-sends it, or its
        attempt went out at or after `sent_before` (the connection's loss: sent on the new connection, not lost)."""
        job = self.pending.get(job_id)
        if job is None or not job.resend or job.outputs:
            return None
        if sent_before is not None and job.attempt_sent >= sent_before:
            return None
        return self._next_attempt(job, time.monotonic() if now is None else now)

    def _next_attempt(self, job: PendingJob, now: float) -> PendingJob:
        """The job's next attempt starts now, under its own request id (every attempt's id stays the job's)."""
        job.attempt += 1
        job.attempt_started = now
        job.lost = False
        self.by_request[job.request_id] = job.job_id
        return job

    def retry_all_now(self, now: float | None = None, sent_before: float | None = None) -> list[PendingJob]:
        return [j for j in (self.retry_now(jid, now, sent_before) for jid in list(self.pending)) if j is not None]

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

    def on_answered(self, job_id: str, now: float | None = None) -> Answer | None:
        """A part answered the job itself (its result reached the results exchange): stop tracking it. An answer
        for a job not (yet) tracked is remembered, so the job's inputs arriving after it are not sent again."""
        job = self.pending.get(job_id)
        if job is None:
            self._remember(job_id)
            return None
        now = time.monotonic() if now is None else now
        return self._finish(job, Answer(job, "answered"), now)

    def on_error(self, request_id: str, code: str, message: str, now: float | None = None) -> Answer | None:
        """An error answers the job only when it comes from its latest attempt: a superseded attempt's error (say
        a join that timed out because its other half died with a broker node) says nothing about the attempt in
        flight, and an error every attempt would meet (bad inputs) comes from the latest one too."""
        job = self._job_of(request_id)
        if job is None or request_id != self._latest_request(job):
            return None
        now = time.monotonic() if now is None else now
        if code in LOST_INPUT_ERRORS and now < job.deadline and not job.outputs:
            # tensors lost on the way, not a bad job: it goes again (ours: at the next tick, while the retry budget
            # lasts; a sender's own job: on its sender's timer), and its deadline answers it if nothing comes
            job.last_error = f"{code}: {message}"
            if not job.resend:
                return None
            if job.attempt < self.max_retries:
                job.lost = True
                return None
        return self._finish(job, Answer(job, "error", code, message), now)

    # -- time passing
    def tick(self, now: float | None = None, expected: Callable[[str], float | None] | None = None
             ) -> tuple[list[PendingJob], list[Answer]]:
        """(jobs to resend under their new request id, answers for jobs past their deadline). `expected(deployment)`:
        what a job takes now (Admission): an attempt younger than that is slow, not lost, and is not sent again
        (under overload a retry would only add work)."""
        now = time.monotonic() if now is None else now
        retries, answers = [], []
        for job in list(self.pending.values()):
            if now >= job.deadline + self.grace_s:
                answers.append(self._finish(job, Answer(
                    job, "error", "deadline_exceeded",
                    f"job {job.job_id} got no result within its deadline of {job.deadline - job.received_at:.3g}s "
                    f"({job.attempt + 1} attempt{'s' if job.attempt else ''}; "
                    f"outputs missing: {', '.join(t for t in job.final_outputs if t not in job.outputs)}"
                    + (f"; last error {job.last_error}" if job.last_error else "") + ")"), now))
            elif (job.resend and job.attempt < self.max_retries and not job.outputs
                  and (job.lost or now - job.attempt_started >= max(
                      job.attempt_timeout_s, (expected(job.deployment) or 0.0) if expected else 0.0))):
                retries.append(self._next_attempt(job, now))
        return retries, answers

    def next_wakeup(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        times = [j.deadline + self.grace_s for j in self.pending.values()]
        times += [j.attempt_started if j.lost else j.attempt_started + j.attempt_timeout_s
                  for j in self.pending.values() if j.resend and j.attempt < self.max_retries and not j.outputs]
        return max(0.0, min(times) - now) if times else 1.0

    # -- bookkeeping
    def _finish(self, job: PendingJob, answer: Answer, now: float) -> Answer:
        self.pending.pop(job.job_id, None)
        for k in range(job.attempt + 1):
            self.by_request.pop(attempt_request_id(job.job_id, k, job.first_request_id), None)
        for rid in job.requests:
            self.by_request.pop(rid, None)
        self._remember(job.job_id)
        answer.latency_s = now - job.received_at
        return answer

    def _remember(self, job_id: str) -> None:
        self.answered[job_id] = None
        self.answered.move_to_end(job_id)
        self.deliveries.pop(job_id, None)
        while len(self.answered) > ANSWERED_MEMORY:
            self.answered.popitem(last=False)


class AnswerMemory:
    """The answers of recent jobs as published (bytes), kept for `retention_s` and at most `max_bytes` in all
    (oldest dropped first): a job id submitted again within that window gets the same answer again."""

    def __init__(self, retention_s: float, max_bytes: int):
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.size = 0
        self._kept: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def keep(self, job_id: str, body: bytes, now: float | None = None) -> None:
        if self.retention_s <= 0 or len(body) > self.max_bytes or job_id in self._kept:
            return
        now = time.monotonic() if now is None else now
        self._kept[job_id] = (now, bytes(body))
        self.size += len(body)
        self._expire(now)

    def get(self, job_id: str, now: float | None = None) -> bytes | None:
        self._expire(time.monotonic() if now is None else now)
        kept = self._kept.get(job_id)
        return None if kept is None else kept[1]

    def _expire(self, now: float) -> None:
        while self._kept:
            job_id, (at, body) = next(iter(self._kept.items()))
            if self.size <= self.max_bytes and now - at <= self.retention_s:
                return
            self._kept.popitem(last=False)
            self.size -= len(body)


class Admission:
    """What a new job of a deployment can expect to take, from the answers seen: at least the time a job takes
    unloaded (a low percentile of recent latencies), and the median latency of the answers of the last few seconds
    (jobs sent now wait behind as many as those did). A job whose remaining deadline is below that is answered at
    once instead of being sent in: under overload the pipeline keeps working on jobs that can still finish
    (goodput), not on doomed ones. Recent answers age out, so a slow spell (an outage) is not held against the
    jobs after it; with no recent answer, only the unloaded latency counts."""

    WINDOW = 64          # recent answers kept per deployment
    BASE_QUANTILE = 0.2  # the unloaded latency: this quantile of the kept latencies
    RECENT_S = 2.0       # the load now: answers of this long ago at most
    MIN_RECENT = 5       # fewer recent answers: the unloaded latency alone

    def __init__(self):
        self._latency: dict[str, deque] = {}
        self.inflight: dict[str, int] = {}

    def sent(self, deployment: str) -> None:
        self.inflight[deployment] = self.inflight.get(deployment, 0) + 1

    def done(self, deployment: str, latency_s: float | None, now: float) -> None:
        """A job of the deployment is over; `latency_s` when it was answered with a result."""
        self.inflight[deployment] = max(0, self.inflight.get(deployment, 0) - 1)
        if latency_s is not None:
            self._latency.setdefault(deployment, deque(maxlen=self.WINDOW)).append((now, latency_s))

    def expected(self, deployment: str, now: float) -> float | None:
        """Seconds a job sent now should take; None before any answer was seen."""
        seen = self._latency.get(deployment)
        if not seen:
            return None
        ordered = sorted(lat for _, lat in seen)
        base = ordered[int(self.BASE_QUANTILE * (len(ordered) - 1))]
        recent = sorted(lat for at, lat in seen if now - at <= self.RECENT_S)
        if len(recent) < self.MIN_RECENT:
            return base
        return max(base, recent[len(recent) // 2])

    def refusal(self, deployment: str, remaining_s: float, now: float) -> str | None:
        """Why a job with `remaining_s` left cannot finish in time, or None."""
        expected = self.expected(deployment, now)
        if expected is None or remaining_s >= expected:
            return None
        return (f"{remaining_s:.3g}s of its deadline left, jobs of {deployment} take about {expected:.3g}s now "
                f"({self.inflight.get(deployment, 0)} in flight): answered at once, not sent")
