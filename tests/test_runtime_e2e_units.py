"""The pure pieces under the runtime's user-facing side: the front end's job bookkeeping (deadline, one retry, one
answer per job), the result store, the cluster description and rabbitmq.conf. No broker, fast."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest

from splitinfer.actors.front_end.tracker import JobTracker, PendingJob, attempt_request_id
from splitinfer.actors.result_store.store import ResultStore, StoreURLError, sqlite_path
from splitinfer.actors.supervisor import plan_actors
from splitinfer.config import ClusterConfig, ConfigError
from splitinfer.config import Settings

REPO = Path(__file__).resolve().parents[1]


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
    t = JobTracker(max_retries=0)
    t.admit(job(outputs=("a:0", "b:0"), deadline_s=2.0), now=0.0)
    t.on_output("j1", "a:0", np.ones(1), [], "s1", now=0.5)
    retries, answers = t.tick(now=1.9)
    assert (retries, answers) == ([], [])
    retries, answers = t.tick(now=2.0)
    assert retries == [] and len(answers) == 1
    assert answers[0].code == "deadline_exceeded" and "b:0" in answers[0].message and "a:0" not in answers[0].message
    assert t.tick(now=5.0) == ([], [])
    assert t.on_output("j1", "b:0", np.ones(1), [], "s2", now=5.0) is None


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


def test_next_wakeup_is_the_nearest_deadline_or_retry():
    t = JobTracker()
    assert t.next_wakeup(now=0.0) == 1.0
    t.admit(job("a", deadline_s=10.0, attempt_timeout_s=4.0), now=0.0)
    t.admit(job("b", deadline_s=3.0, attempt_timeout_s=5.0), now=0.0)
    assert t.next_wakeup(now=1.0) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------ result store

def test_store_urls():
    assert sqlite_path("sqlite:////tmp/x.db") == "/tmp/x.db"
    assert sqlite_path("sqlite:///rel/x.db") == "rel/x.db"
    assert sqlite_path("sqlite://") == ":memory:"
    assert sqlite_path("/plain/path.db") == "/plain/path.db"
    with pytest.raises(StoreURLError, match="postgresql"):
        sqlite_path("postgresql://host/db")
    assert Settings(cache_dir=Path("/c")).results_url() == "sqlite:////c/results.db"


def test_store_keeps_every_row_and_queries_by_namespace_job_and_kind(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with ResultStore(url) as db:
        a = db.add("ns1", "result", "j1", deployment="d", latency_s=0.1, served_by=["s1"],
                   hops=[{"part": "part0", "server": "s1", "compute_s": 0.01}],
                   outputs={"o:0": {"shape": [1, 3], "dtype": "<f4"}}, body=b"\x01\x02")
        db.add("ns1", "error", "j2", code="wrong_shape", message="bad")
        db.add("ns1", "result", "j1")  # a duplicate answer is kept, so it can be seen
        db.add("ns2", "result", "j9")
        with pytest.raises(ValueError):
            db.add("ns1", "maybe", "j3")
        assert db.count("ns1") == 3 and db.count() == 4 and db.count("ns1", kind="error") == 1
        assert [r.job_id for r in db.query("ns1", job_id="j1")] == ["j1", "j1"]
        assert [r.code for r in db.query("ns1", kind="error")] == ["wrong_shape"]
        newest = db.query("ns1", limit=1, newest_first=True)[0]
        assert newest.job_id == "j1" and newest.id > a
        first = db.query("ns1")[0]
        assert first.hops[0]["compute_s"] == 0.01 and first.served_by == ["s1"] and db.body(a) == b"\x01\x02"
        assert db.query("ns1", after_id=newest.id) == []
    # a second handle (the CLI) reads what the writer committed, and follow() yields new rows
    with ResultStore(url) as writer, ResultStore(url) as reader:
        stop = threading.Event()
        got = []

        def follow():
            for row in reader.follow("ns1", after_id=newest.id, poll_s=0.05, stop=stop):
                got.append(row.job_id)
                stop.set()

        th = threading.Thread(target=follow)
        th.start()
        writer.add("ns1", "result", "j5")
        th.join(10)
        assert got == ["j5"]


# ------------------------------------------------------------------------------------------------ cluster config

def test_cluster_config_from_toml(tmp_path):
    cfg = tmp_path / "cluster.toml"
    cfg.write_text('namespace = "lab"\n[[servers]]\nid = "phone"\nsite = "device"\n'
                   '[[servers]]\nid = "edge"\nsite = "edge"\nreplicas = 2\n')
    c = ClusterConfig.load(cfg)
    assert c.namespace == "lab" and [s.process_ids() for s in c.servers] == [["phone"], ["edge-1", "edge-2"]]
    names = [n for n, _ in plan_actors(c)]
    assert names == ["registry", "state_pool", "model_pool", "result_store", "optimizer", "server:phone", "server:edge-1",
                     "server:edge-2",
                     "front_end"]
    argv = dict(plan_actors(c))["server:edge-2"]
    assert argv[1:3] == ["-m", "splitinfer.actors.model_server"] and argv[3:7] == ["--id", "edge-2", "--site", "edge"]


@pytest.mark.parametrize("text, needle", [
    ('[[servers]]\nid = "a"\n[[servers]]\nid = "a"\n', "appears twice"),
    ('[[servers]]\nid = "a b"\n', "servers.0.id"),
    ('[[servers]]\nid = "a"\nreplicas = 0\n', "replicas"),
    ('servers = [', "cannot read"),
])
def test_bad_cluster_configs_say_what_is_wrong(tmp_path, text, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        ClusterConfig.load(cfg)


def test_default_cluster_has_distinct_servers_over_sites():
    c = ClusterConfig.default(5)
    assert [s.id for s in c.servers] == ["s1", "s2", "s3", "s4", "s5"]
    assert {s.site for s in c.servers} == {"device", "edge", "cloud"}


def test_rabbitmq_conf_fits_the_largest_message_and_sets_heartbeat_and_consumer_timeout():
    conf = dict(
        (k.strip(), v.split("#")[0].strip())
        for k, v in (line.split("=", 1) for line in (REPO / "rabbitmq.conf").read_text().splitlines()
                     if "=" in line and not line.lstrip().startswith("#"))
    )
    assert int(conf["max_message_size"]) >= Settings().max_message_bytes + 1024 * 1024
    assert int(conf["max_message_size"]) <= 512 * 1024 * 1024  # RabbitMQ's own ceiling
    assert 5 <= int(conf["heartbeat"]) <= 60
    assert int(conf["consumer_timeout"]) >= 60_000


def test_results_follow_prints_new_rows_until_ctrl_c(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    url = f"sqlite:///{tmp_path / 'r.db'}"
    with ResultStore(url) as db:
        db.add("nsf", "result", "old")
    proc = subprocess.Popen([sys.executable, "-m", "splitinfer.cli", "results", "--follow", "--json", "--store", url,
                             "--namespace", "nsf"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        first = json.loads(proc.stdout.readline())
        assert first["job_id"] == "old"
        with ResultStore(url) as db:
            db.add("other-ns", "result", "not-mine")
            db.add("nsf", "error", "new", code="deadline_exceeded", message="late")
        line = json.loads(proc.stdout.readline())
        assert line["job_id"] == "new" and line["code"] == "deadline_exceeded"
    finally:
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)  # reads stderr as well, so a full pipe cannot stall the process
    assert proc.returncode == 0, err
