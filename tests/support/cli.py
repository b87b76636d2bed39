"""The `splitinfer` command as a user runs it: a fresh process, its exit code, stdout and stderr."""

from __future__ import annotations

import os
import subprocess
import sys


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitinfer.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**(env or os.environ), "COLUMNS": "200"})


def cli_many(commands: list[tuple[str, ...]], env: dict | None = None, parallel: int = 3,
             timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run independent CLI commands a few at a time (each process pays the package's import time)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda args: cli(*args, env=env, timeout=timeout), commands))


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
