"""The front end's job bookkeeping (deadline, one retry, one answer per job), as pure code: no broker, fast."""

from __future__ import annotations

import numpy as np
import pytest

from splitinfer.actors.front_end.tracker import Admission, AnswerMemory, JobTracker, PendingJob, attempt_request_id


def job(job_id="j1", outputs=("out:0",), now=0.0, deadline_s=10.0, attempt_timeout_s=4.0) -> PendingJob:
    return PendingJob(job_id=job_id, deployment="d", reply_to=job_id, inputs={"in:0": np.zeros(1, np.float32)},
                      final_outputs=list(outputs), received_at=now, deadline=now + deadline_s,
                      attempt_timeout_s=attempt_timeout_s)


# ------------------------------------------------------------------------------------------------ JobTracker

def test_a_job_completes_when_every_final_output_arrived_and_is_answered_once():
    t = JobTracker()
    j = job(outputs=("a:0", "b:0"))
    assert t.admit(j, now=0.0) is None
    assert t.on_output("j1", "a:0", np.ones(1), [], "s1", now=1.0) is None
    assert t.on_output("j1", "a:0", np.ones(1), [], "s1", now=1.1) is None  # duplicate output: ignored
    ans = t.on_output("j1", "b:0", np.ones(1), [], "s2", now=1.5)
    assert ans is not None and ans.kind == "result" and ans.latency_s == pytest.approx(1.5)
    assert ans.job.served_by == ["s1", "s2"]
    # whatever comes later for the answered job is dropped: no second answer
    assert t.on_output("j1", "b:0", np.ones(1), [], "s2", now=2.0) is None
    assert t.on_error("j1", "boom", "late error", now=2.0) is None
    assert t.tick(now=100.0) == ([], [])
    assert t.admit(job(), now=3.0).code == "duplicate_job"


def test_deadline_gives_one_error_naming_the_missing_outputs():
    t = JobTracker(max_retries=0, grace_s=0.0)
    t.admit(job(outputs=("a:0", "b:0"), deadline_s=2.0), now=0.0)
    t.on_output("j1", "a:0", np.ones(1), [], "s1", now=0.5)
    retries, answers = t.tick(now=1.9)
    assert (retries, answers) == ([], [])
    retries, answers = t.tick(now=2.0)
    assert retries == [] and len(answers) == 1
    assert answers[0].code == "deadline_exceeded" and "b:0" in answers[0].message and "a:0" not in answers[0].message
    assert t.tick(now=5.0) == ([], [])
    assert t.on_output("j1", "b:0", np.ones(1), [], "s2", now=5.0) is None


def test_an_answer_a_part_published_ends_tracking_and_the_deadline_waits_its_grace():
    t = JobTracker(max_retries=0, grace_s=0.5)
    t.admit(job("a", deadline_s=2.0), now=0.0)
    t.admit(job("b", deadline_s=2.0), now=0.0)
    assert t.tick(now=2.2) == ([], [])            # past the deadline, within the grace: an answer may be on its way
    ans = t.on_answered("a", now=2.3)              # it was: the part published it straight to the caller
    assert ans is not None and ans.kind == "answered" and ans.latency_s == pytest.approx(2.3)
    retries, answers = t.tick(now=2.5)
    assert retries == [] and [(x.job.job_id, x.code) for x in answers] == [("b", "deadline_exceeded")]
    assert t.on_answered("b", now=2.6) is None      # too late: b was answered once, with its error
    # an answer heard before its job: the job's inputs arriving after it are known as answered
    assert t.on_answered("c", now=3.0) is None and t.is_answered("c")
    assert t.admit(job("c"), now=3.1).code == "duplicate_job"


def test_a_job_late_on_arrival_is_answered_at_once():
    t = JobTracker()
    ans = t.admit(job(deadline_s=1.0), now=1.5)
    assert ans is not None and ans.code == "deadline_exceeded" and "after its deadline" in ans.message
    assert t.is_answered("j1") and "j1" not in t.pending


def test_one_retry_under_a_new_request_id_and_a_late_first_attempt_still_counts():
    t = JobTracker(max_retries=1)
    t.admit(job(deadline_s=10.0, attempt_timeout_s=3.0), now=0.0)
    assert t.tick(now=2.9) == ([], [])
    retries, answers = t.tick(now=3.0)
    assert [r.request_id for r in retries] == [attempt_request_id("j1", 1)] and answers == []
    assert attempt_request_id("j1", 1) != "j1"
    # bounded: no second retry
    assert t.tick(now=6.5) == ([], [])
    # the first attempt's output arrives late: it is the same work, so it answers the job
    ans = t.on_output("j1", "out:0", np.ones(1), [], "s1", now=7.0)
    assert ans is not None and ans.kind == "result"
    assert t.on_output(attempt_request_id("j1", 1), "out:0", np.ones(1), [], "s1", now=7.1) is None


def test_a_redelivered_job_runs_under_fresh_request_ids_and_job_ids_may_contain_the_separator():
    t = JobTracker(max_retries=1)
    j = job("a~1", attempt_timeout_s=1.0)
    j.first_request_id = "a~1~rdeadbeef"
    t.admit(j, now=0.0)
    assert j.request_id == "a~1~rdeadbeef"
    assert t.on_output("a~1", "out:0", np.ones(1), [], "s1") is None  # the crashed front end's attempt: not ours
    retries, _ = t.tick(now=1.0)
    assert retries[0].request_id == "a~1~1"
    ans = t.on_output("a~1~rdeadbeef", "out:0", np.ones(1), [], "s1", now=1.5)
    assert ans is not None and ans.job.job_id == "a~1"
    assert t.by_request == {} and t.pending == {}


def test_an_error_from_a_server_answers_the_job_and_unknown_ids_are_ignored():
    t = JobTracker()
    t.admit(job(), now=0.0)
    assert t.on_error("other", "x", "y") is None
    ans = t.on_error("j1", "wrong_shape", "bad tensor", now=0.2)
    assert ans.kind == "error" and ans.code == "wrong_shape"
    assert t.on_output("j1", "out:0", np.ones(1), [], "s1") is None


def test_an_error_from_a_superseded_attempt_does_not_answer_the_job():
    # the front end re-sent the job: the first attempt's join timing out says nothing about the second
    t = JobTracker(max_retries=1, grace_s=0.0)
    t.admit(job(attempt_timeout_s=1.0), now=0.0)
    retries, _ = t.tick(now=1.0)
    assert [r.request_id for r in retries] == ["j1~1"]
    assert t.on_error("j1", "join_timeout", "other half lost", now=1.5) is None
    assert t.on_output("j1", "out:0", np.ones(1), [], "s1", now=1.6).kind == "result"  # a late output still counts
    # a job its sender re-sends (a Client's): only its latest request's errors answer it
    t.admit(job("c1"), now=2.0, retries=False)
    assert t.another_attempt("c1", "c1.b")
    assert t.on_error("c1", "join_timeout", "lost", now=2.5) is None
    ans = t.on_error("c1.b", "wrong_shape", "bad tensor", now=2.6)
    assert ans is not None and ans.code == "wrong_shape"
    assert t.by_request == {} and t.pending == {}


def test_lost_inputs_send_the_job_again_at_once_and_answer_only_when_retries_or_time_run_out():
    t = JobTracker(max_retries=1, grace_s=0.0)
    t.admit(job(attempt_timeout_s=5.0, deadline_s=10.0), now=0.0)
    # a join timed out: its other inputs were lost with a broker node; no answer, a retry at the next tick
    assert t.on_error("j1", "join_timeout", "inputs did not arrive", now=1.0) is None
    assert t.next_wakeup(now=1.0) == 0.0
    retries, answers = t.tick(now=1.0)
    assert [r.request_id for r in retries] == ["j1~1"] and answers == []
    # the retry budget spent: the same error now answers the job
    ans = t.on_error("j1~1", "join_timeout", "inputs did not arrive again", now=2.0)
    assert ans is not None and ans.code == "join_timeout"
    # a job its sender re-sends: swallowed (the sender tries again), and the deadline says what went wrong
    t.admit(job("c1", deadline_s=3.0), now=0.0, retries=False)
    assert t.on_error("c1", "join_timeout", "inputs did not arrive", now=1.0) is None
    # ... told at once: its latest attempt is the one to tell its sender about, an earlier one is not, nor a job
    # the tracker sends itself
    assert t.sender_resends("c1").job_id == "c1"
    assert t.another_attempt("c1", "c1.b") and t.sender_resends("c1") is None and t.sender_resends("c1.b")
    t.admit(job("own"), now=0.0)
    assert t.sender_resends("own") is None and t.sender_resends("nobody") is None
    _, answers = t.tick(now=3.0)
    assert [a.code for a in answers] == ["deadline_exceeded"] and "join_timeout" in answers[0].message


def test_next_wakeup_is_the_nearest_deadline_or_retry():
    t = JobTracker(grace_s=0.0)
    assert t.next_wakeup(now=0.0) == 1.0
    t.admit(job("a", deadline_s=10.0, attempt_timeout_s=4.0), now=0.0)
    t.admit(job("b", deadline_s=3.0, attempt_timeout_s=5.0), now=0.0)
    assert t.next_wakeup(now=1.0) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------ reliability bookkeeping

def test_deliveries_are_counted_per_unanswered_job_and_forgotten_once_answered():
    t = JobTracker()
    assert [t.count_delivery("j1") for _ in range(3)] == [1, 2, 3]
    assert t.count_delivery("j2", at_least=5) == 5  # the broker's own count (a quorum queue's) wins when higher
    t.admit(job("j1"), now=0.0)
    t.on_answered("j1", now=1.0)
    assert t.count_delivery("j1") == 1


def test_retry_now_starts_a_new_attempt_whatever_the_budget_and_only_for_jobs_it_sends():
    t = JobTracker(max_retries=0)
    t.admit(job("j1"), now=0.0)
    client_job = job("c1")
    t.admit(client_job, now=0.0, retries=False)
    again = t.retry_all_now(now=0.5)
    assert [j.job_id for j in again] == ["j1"] and again[0].request_id == attempt_request_id("j1", 1)
    # both attempts' outputs count for the job
    assert t.on_output(attempt_request_id("j1", 0), "out:0", np.ones(1), [], "s", now=0.6).kind == "result"
    assert t.retry_now("c1") is None and t.retry_now("nope") is None


def test_after_an_outage_only_attempts_sent_before_the_loss_go_again():
    """An attempt sent once the connection was back (its send rode out the outage) was not lost: re-sending it
    would only answer the job twice."""
    t = JobTracker()
    before, after = job("early"), job("late")
    t.admit(before, now=0.0)
    t.admit(after, now=0.0)
    before.attempt_sent, after.attempt_sent = 1.0, 5.0   # the connection was lost at 3.0, back at 4.0
    again = t.retry_all_now(now=6.0, sent_before=3.0)
    assert [j.job_id for j in again] == ["early"]
    assert after.attempt == 0 and t.retry_now("late", now=6.0) is not None  # without a loss time: every one


def test_forget_lets_an_answered_id_run_again():
    t = JobTracker()
    t.admit(job("j1"), now=0.0)
    t.on_answered("j1", now=1.0)
    assert t.admit(job("j1"), now=2.0).code == "duplicate_job"
    t.forget("j1")
    assert t.admit(job("j1", now=2.0), now=2.0) is None


def test_answer_memory_keeps_answers_within_its_age_and_bytes():
    m = AnswerMemory(retention_s=10.0, max_bytes=100)
    m.keep("a", b"x" * 40, now=0.0)
    m.keep("b", b"y" * 40, now=1.0)
    assert m.get("a", now=2.0) == b"x" * 40
    m.keep("c", b"z" * 40, now=3.0)  # 120 bytes: the oldest goes
    assert m.get("a", now=3.0) is None and m.get("b", now=3.0) == b"y" * 40
    assert m.get("b", now=11.5) is None  # older than the retention
    m.keep("huge", b"h" * 101, now=12.0)
    assert m.get("huge", now=12.0) is None
    assert AnswerMemory(0.0, 100).get("a") is None


def test_admission_refuses_a_job_that_cannot_finish_at_the_recent_latency():
    a = Admission()
    assert a.refusal("d", 0.001, now=0.0) is None  # nothing seen yet: every job goes in
    for k in range(10):  # unloaded: 0.1 s each
        a.sent("d")
        a.done("d", 0.1, now=k * 0.5)
    assert a.refusal("d", 0.05, now=5.0) is not None  # below the unloaded latency
    assert a.refusal("d", 0.2, now=5.0) is None
    for _ in range(20):
        a.sent("d")
    for k in range(6):  # loaded: the last answers took 1 s
        a.done("d", 1.0, now=5.0 + k * 0.1)
    reason = a.refusal("d", 0.5, now=5.6)
    assert reason is not None and "14 in flight" in reason and "1s now" in reason
    assert a.refusal("d", 1.5, now=5.6) is None
    # the slow spell ages out: with no recent answer, only the unloaded latency counts
    assert a.refusal("d", 0.5, now=20.0) is None
    a.done("d", None, now=20.0)                        # an error: nothing learnt, one fewer in flight
    assert a.inflight["d"] == 13


def test_an_attempt_younger_than_what_jobs_take_now_is_not_retried():
    t = JobTracker()
    t.admit(job("j1", attempt_timeout_s=1.0), now=0.0)
    assert t.tick(now=1.5, expected=lambda dep: 3.0) == ([], [])  # slow under load, not lost
    retries, _ = t.tick(now=3.1, expected=lambda dep: 3.0)
    assert [j.job_id for j in retries] == ["j1"]
