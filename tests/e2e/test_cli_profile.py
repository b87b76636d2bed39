"""`splitinfer profile` as a user runs it: a fresh process, progress on stderr, JSON on stdout, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_profile_command_in_a_fresh_process(tmp_path):
    """The real entry point: progress on stderr, JSON on stdout, exit 0; a bad shape exits 1 with one line."""
    env = {**os.environ, "SPLITINFER_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "splitinfer.cli", "profile", "keras.applications:MobileNetV3Small",
           "--input-shape", "96x96x3", "--json", "--rounds", "5", "--segments", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)
    assert data["input_shapes"] == [[96, 96, 3]] and data["machine"]["intra_op_threads"] == 1
    bad = subprocess.run(cmd[:5] + ["--input-shape", "5x5x3"], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 1
    lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in bad.stderr
