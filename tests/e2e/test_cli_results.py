"""`splitinfer results --follow` as a user runs it: a fresh process printing new rows of the result store until
Ctrl-C, then exiting cleanly."""

from __future__ import annotations

from splitinfer.actors.result_store.store import ResultStore


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
        time.sleep(0.2)  # not a wait for an event: let the CLI go back to following, where a user's Ctrl-C lands
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)  # reads stderr as well, so a full pipe cannot stall the process
    assert proc.returncode == 0, err
