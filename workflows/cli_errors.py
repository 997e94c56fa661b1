"""Every failure as one line on stderr that names the fix, and an exit code that tells the truth.

Errors ca-flow expects (bad input, a store or cluster that does not answer) are their message. An
error raised inside a Ray task or trial is unwrapped to its cause. Anything else is its type and last
line, plus the path of a log file with the full traceback (`ca-flow --debug` prints it instead).
"""

from __future__ import annotations

import sys
import time
import traceback

import typer
from typer._click.exceptions import UsageError  # Typer vendors its own Click
from typer.core import TyperGroup

from clip_adapter.errors import CaFlowError, last_line

from .settings import LOGS

LOG_DIR = LOGS


# How the command line spells the fixes the library names by a hint (clip_adapter.errors.CaFlowError).
HINTS = {
    "random_weights": ", or use --pretrained random for an offline demo",
    "data_root_as": " as --data-root DIR (or set CA_FLOW_DATA_ROOT)",
    "data_root_or": " or pass --data-root DIR (or set CA_FLOW_DATA_ROOT)",
    "datasets": "; pass --datasets all or --datasets NAME[,NAME...]",
}


def with_hint(exc: CaFlowError) -> str:
    return str(exc) + HINTS.get(exc.hint, "")


def unwrap(exc: BaseException) -> BaseException:
    """The error a Ray task or Tune trial raised, not Ray's wrapper around it."""
    for _ in range(5):
        cause = getattr(exc, "cause", None)
        if cause is None or cause is exc:
            break
        exc = cause
    return exc


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def message(exc: BaseException, debug: bool = False) -> str:
    """The line to print for `exc`; unexpected errors also leave a traceback in a log file."""
    exc = unwrap(exc)
    if isinstance(exc, CaFlowError):
        return one_line(with_hint(exc))
    mlflow = sys.modules.get("mlflow.exceptions")
    if mlflow and isinstance(exc, mlflow.MlflowException):
        return f"MLflow: {one_line(exc.message)[:400]}"
    last = f"{type(exc).__name__}: {last_line(exc, 10_000) if str(exc).strip() else 'no message'}"
    if debug:
        return last
    try:
        folder = LOG_DIR.expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"ca-flow-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.write_text("".join(traceback.format_exception(exc)))
        return f"{last}; full traceback in {log} (ca-flow --debug prints it)"
    except OSError:
        return f"{last} (ca-flow --debug prints the traceback)"


def fail(text: str, code: int = 1) -> None:
    typer.echo(f"error: {one_line(text)}", err=True)
    raise typer.Exit(code)


class Group(TyperGroup):
    """The app's command group: turns whatever a command raises into one line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except UsageError as exc:  # as Click: exit 2, but one line
            command = exc.ctx.command_path if exc.ctx else "ca-flow"
            fail(f"{exc.format_message()}; see `{command} -h`", 2)
        except Exception as exc:
            debug = bool((ctx.obj or {}).get("debug"))
            if debug:
                traceback.print_exception(unwrap(exc), file=sys.stderr)
            fail(message(exc, debug))
