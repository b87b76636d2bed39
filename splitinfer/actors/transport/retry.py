"""Every retry loop of the runtime, with its bounds named in one place, and what counts as worth retrying.

A retry is one of these policies and nothing else: publishing (a nack, a returned message, a lost channel), an
actor's first connection (the broker may still be starting), the supervisor's restarts of a crashed actor, and a
job's re-sends by the front end. Errors are told apart by type (`classify`), never by matching their text.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Iterator

import aiormq.exceptions


@dataclass(frozen=True)
class Backoff:
    """At most `attempts` tries; before try k+1 wait first_s * factor**k, never more than max_s."""

    attempts: int
    first_s: float
    max_s: float
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        """The wait after `failures` failed tries in a row (failures >= 1)."""
        return min(self.max_s, self.first_s * self.factor ** max(0, failures - 1))

    def delays(self) -> Iterator[float]:
        """The waits between the tries: attempts - 1 of them."""
        for k in range(1, self.attempts):
            yield self.delay(k)


# A confirmed publish: a nack, a returned (unroutable) message or a lost channel is tried again this often.
PUBLISH = Backoff(attempts=4, first_s=0.1, max_s=0.8)
# Sent once: a heartbeat (the next one follows within an interval), a probe of whether a broker answers.
ONCE = Backoff(attempts=1, first_s=0.0, max_s=0.0)
# An actor process's first connection: the supervisor may start actors before the broker answers.
CONNECT = Backoff(attempts=20, first_s=0.5, max_s=5.0)
# A lost connection is tried again this often (aio-pika's robust connection; its default is 5 s).
RECONNECT_INTERVAL_S = 1.0
# A restarted model server loading again the parts it hosted: the model pool may not answer yet.
RESTORE = Backoff(attempts=30, first_s=0.5, max_s=5.0)
# A Client whose broker is away (restarting) keeps trying to send a job this way, never past the job's deadline;
# a front end whose model pool does not answer (restarting) asks again this way, within the job's deadline.
OUTAGE = Backoff(attempts=60, first_s=0.2, max_s=2.0)
# The front end's own answer (an error, an assembled result): more tries than a tensor's, then the job goes to the
# dead-letter queue with the reason, never back to the jobs queue (that would recompute it forever).
ANSWER = Backoff(attempts=6, first_s=0.1, max_s=2.0)
# A job delivered this many times without being answered is poison: answered `poison_job`, dead-lettered.
MAX_JOB_DELIVERIES = 3
# A user's command or the SDK: one try, this long, then a one-line error (no minute of silent retries).
CLIENT_CONNECT_TIMEOUT_S = 5.0
# The supervisor restarts a crashed actor after these waits; a run this long counts as healthy (resets the count).
RESTART = Backoff(attempts=9, first_s=0.5, max_s=10.0)
HEALTHY_AFTER_S = 60.0
# The front end re-sends a job whose attempt produced nothing after this share of its deadline, this many times.
# errors that say an attempt's tensors were lost on the way (a join whose other inputs never came: they went down with
# a broker node), not that the job is wrong: another attempt may well succeed, so they answer no job by themselves
LOST_INPUT_ERRORS = frozenset({"join_timeout"})
JOB_RETRIES = 1
JOB_RETRY_SHARE = 0.5
# The front end answers `deadline_exceeded` this long after a job's deadline: an answer the last part published just
# in time is still on its way to the caller then, and must not be contradicted.
DEADLINE_GRACE_S = 0.5
# A Client answers its own job `deadline_exceeded` only this long after the front end would have: the front end's
# answer (kept by the result store) comes first; this one covers a cluster without a front end.
CLIENT_DEADLINE_SLACK_S = 1.0


class Forbidden(PermissionError):
    """The broker refused this user the operation (its permissions: `splitinfer broker-users`); never retried."""


class Unroutable(Exception):
    """The broker returned a mandatory message: no queue is bound to its routing key (AMQP 312 NO_ROUTE)."""


NO_ROUTE = 312


def is_unroutable(exc: BaseException) -> bool:
    frame = getattr(exc, "frame", None)
    return isinstance(exc, (Unroutable, aiormq.exceptions.PublishError)) and (
        isinstance(exc, Unroutable) or getattr(frame, "reply_code", None) == NO_ROUTE)


# Failures of a publish that another try may cure: the broker nacked or returned it, the channel or connection was
# lost (a robust connection reopens it), or the confirm did not come in time.
TRANSIENT = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError,
             asyncio.TimeoutError)


def broker_lost(exc: BaseException) -> bool:
    """The connection to the broker went away (a restart, a node down): not a fault of the message in hand."""
    return isinstance(exc, (aiormq.exceptions.AMQPConnectionError, ConnectionError))


def classify(exc: BaseException) -> str:
    """'unroutable', 'forbidden', 'transient' or 'fatal' (a bug or a bad argument: retrying cannot help)."""
    if is_unroutable(exc):
        return "unroutable"
    if isinstance(exc, (Forbidden, aiormq.exceptions.ChannelAccessRefused)):
        return "forbidden"
    if isinstance(exc, TRANSIENT):
        return "transient"
    return "fatal"
