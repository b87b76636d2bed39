"""`splitinfer ...` commands: each concern registers its commands from a module of its own (commands only; the
measuring harness that `demo` and the benchmarks share is splitinfer.harness)."""

from splitinfer.cli import split_cmds  # noqa: F401  (registers split, verify, cuts)
from splitinfer.cli import profile_cmds  # noqa: F401  (profile, calibrate)
from splitinfer.cli import plan_cmds  # noqa: F401  (plan)
from splitinfer.cli import cluster_cmds  # noqa: F401  (up, status)
from splitinfer.cli import deploy_cmds  # noqa: F401  (deploy, undeploy)
from splitinfer.cli import job_cmds  # noqa: F401  (infer, results)
from splitinfer.cli import demo_cmds  # noqa: F401  (demo)
from splitinfer.cli.app import app, main

__all__ = ["app", "main"]
