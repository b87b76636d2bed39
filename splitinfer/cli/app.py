"""The typer app and the one rule every command follows: a bad input is one line on stderr and exit 1."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

app = typer.Typer(
    name="splitinfer",
    help="Split Keras models into parts and run them across device, edge and cloud over RabbitMQ.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


class UserError(Exception):
    """An error the user can fix; shown as one line, never as a traceback."""


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# (module, class) of the errors the project raises for inputs a user can fix. Looked up in sys.modules rather than
# imported: importing the splitter loads TensorFlow, seconds that a broker-only command should not pay.
EXPECTED_ERRORS = (
    ("splitinfer.splitter.graph", "SplitError"),
    ("splitinfer.planner.model", "PlanError"),
    ("splitinfer.actors.supervisor", "ClusterError"),
)


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, UserError):
        return True
    for module, name in EXPECTED_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def user_errors(fn):
    """Turn the project's expected errors (SplitError and friends) into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_user_error(exc):
                raise
            fail(str(exc))
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130)

    return wrapper


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
