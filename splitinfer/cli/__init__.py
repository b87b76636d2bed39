"""`splitinfer ...` commands. Each concern registers its commands from its own module."""

from splitinfer.cli.app import app, main  # noqa: F401
from splitinfer.cli import split_cmds  # noqa: F401,E402  (registers split, verify, cuts)
from splitinfer.cli import profile_cmds  # noqa: F401,E402  (registers profile, calibrate)
from splitinfer.cli import runtime_cmds  # noqa: F401,E402  (registers up, deploy, infer, results, status, demo)
from splitinfer.cli import plan_cmds  # noqa: F401,E402  (registers plan, undeploy; deploy MODEL lives here too)

__all__ = ["app", "main"]
