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
- the first complete result or error wins; whatever arrives for an answered job is dropped (bounded memory).
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from splitinfer.actors.transport.retry import DEADLINE_GRACE_S, JOB_RETRIES, JOB_RETRY_SHARE

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
        """The sender of a job it re-sends itself tried again under `request_id`: that attempt's errors are the
        job's too. False when the job is not tracked."""
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
            if now >= job.deadline + self.grace_s:
                answers.append(self._finish(job, Answer(
                    job, "error", "deadline_exceeded",
                    f"job {job.job_id} got no result within its deadline of {job.deadline - job.received_at:.3g}s "
                    f"({job.attempt + 1} attempt{'s' if job.attempt else ''}; "
                    f"outputs missing: {', '.join(t for t in job.final_outputs if t not in job.outputs)})"), now))
            elif (job.resend and job.attempt < self.max_retries and not job.outputs
                  and now - job.attempt_started >= job.attempt_timeout_s):
                job.attempt += 1
                job.attempt_started = now
                self.by_request[job.request_id] = job.job_id
                retries.append(job)
        return retries, answers

    def next_wakeup(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        times = [j.deadline + self.grace_s for j in self.pending.values()]
        times += [j.attempt_started + j.attempt_timeout_s for j in self.pending.values()
                  if j.resend and j.attempt < self.max_retries and not j.outputs]
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
        while len(self.answered) > ANSWERED_MEMORY:
            self.answered.popitem(last=False)
