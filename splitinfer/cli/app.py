"""The typer app, the rules every command follows, and what commands share.

- A bad input is one line on stderr and exit 1 (`user_errors`, `main`); never a traceback.
- One meaning per flag across commands: `-o/--out` where a command writes, `-c/--config` the cluster file,
  `-d/--deployment` a deployment id, `-i/--input` an input file, `-p/--placement`, `-r/--replicas`,
  `-f/--follow`, `-b/--batch`; counts have long names only (`--parts`, `--servers`, `--limit`, `--jobs`,
  `--concurrency`); `--json` gives machine output with the same field names everywhere (`hops` for the per-hop
  timings); `--namespace` and `--broker-url` on every command that talks to the broker.
- Tables stay readable when piped: the console is wide when stdout is not a terminal, ids never wrap.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

import typer
import typer.core
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from splitinfer.actors.supervisor.broker import BrokerError
from splitinfer.actors.transport import Forbidden, NoBroker
from splitinfer.client import ClientError, JobFailed
from splitinfer.config import ConfigError, Settings, get_settings
from splitinfer.planner import PlanError, parse_duration
from splitinfer.splitter.errors import SplitError

PIPED_WIDTH = 200  # columns when stdout is not a terminal: a table in a file or a pipe keeps one row per line

app = typer.Typer(
    name="splitinfer",
    help="Split Keras models into parts and run them across device, edge and cloud over RabbitMQ.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)
err_console = Console(stderr=True)

NS_HELP = "broker namespace (default: SPLITINFER_NAMESPACE or 'splitinfer')"
BROKER_HELP = "broker URL, or a cluster's node URLs separated by commas (default: SPLITINFER_BROKER_URL)"
MODEL_HELP = "a .keras or .onnx file, or keras.applications:NAME (built with weights=None)"
SHAPE_HELP = "input shape without batch, e.g. 224x224x3 (keras.applications default 224x224x3)"

# Typer's rich help prints a value type after every option, `<bool>` after a switch too: a switch takes no value.
_option_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _option_type(self, ctx)


class UserError(Exception):
    """An error the user can fix; shown as one line, never as a traceback."""


# the project's errors for inputs a user can fix
EXPECTED_ERRORS = (UserError, SplitError, PlanError, ConfigError, BrokerError, NoBroker, Forbidden)


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn the project's expected errors (SplitError and friends) into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EXPECTED_ERRORS as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130)

    return wrapper


def cluster_settings(namespace: Optional[str] = None, broker_url: Optional[str] = None) -> Settings:
    """The settings, with the command line's --namespace / --broker-url over the environment's."""
    s = get_settings()
    updates = {k: v for k, v in (("namespace", namespace), ("broker_url", broker_url)) if v}
    return s.model_copy(update=updates) if updates else s


def client_errors(coro):
    """Run a coroutine that talks to the cluster; the runtime's expected failures become one-line UserErrors."""
    try:
        return asyncio.run(coro)
    except ClientError as exc:
        raise UserError(str(exc)) from None
    except JobFailed as exc:
        raise UserError(f"{exc.error.code}: {exc.error.message}") from None
    except ConnectionError as exc:
        raise UserError(str(exc)) from None
    except TimeoutError as exc:
        raise UserError(str(exc) or "timed out waiting for the cluster") from None


def duration_option(text: Optional[str], flag: str) -> Optional[float]:
    """`50ms`, `0.05s` or `50` (ms) -> seconds; a bad value is one line naming the flag."""
    try:
        return parse_duration(text)
    except PlanError as exc:
        raise UserError(f"{flag}: {exc}") from None


def progress_bar(disable: bool) -> Progress:
    """Long work shows a bar on stderr (stdout stays clean for --json)."""
    return Progress(
        TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True, disable=disable,
    )


def _version(value: bool) -> None:
    if value:
        try:
            print(f"splitinfer {version('splitinfer')}")
        except PackageNotFoundError:  # running from a source tree that was never installed
            print("splitinfer (not installed)")
        raise typer.Exit(0)


@app.callback()
def _root(version_: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                        help="print the version and exit")) -> None:
    """Split Keras models into parts and run them across device, edge and cloud over RabbitMQ."""


def main() -> None:
    """Run the CLI; a malformed command line (unknown command or option, `--parts two`) is one line too.

    Typer's usage errors are Click exceptions (vendored by recent Typer, so not importable as `click`): they are
    recognised by what they carry, a `format_message()` and an `exit_code`."""
    try:
        code = app(prog_name="splitinfer", standalone_mode=False)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if not (callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)):
            raise
        if not exc.format_message().strip():  # `splitinfer` alone: the help was printed
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        err_console.print(f"[bold red]error:[/] {exc.format_message()}{hint}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
