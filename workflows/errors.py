"""Every failure as one line on stderr that names the fix, and an exit code that tells the truth.

Errors ca-flow expects (bad input, a store or cluster that does not answer) are their message. An
error raised inside a Ray task or trial is unwrapped to its cause. Anything else is its type and last
line, plus the path of a log file with the full traceback (`ca-flow --debug` prints it instead).
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import typer
from typer._click.exceptions import UsageError  # Typer vendors its own Click
from typer.core import TyperGroup

LOG_DIR = Path("~/.cache/ca-flow/logs")


def expected() -> tuple[type, ...]:
    from clip_adapter.backbone import BackboneError
    from clip_adapter.datasets import DatasetError
    from clip_adapter.images import ImageError

    from .grid import SweepError
    from .tracking import TrackingError

    kinds = [BackboneError, DatasetError, ImageError, SweepError, TrackingError]
    if "workflows.promote" in sys.modules:
        kinds.append(sys.modules["workflows.promote"].PromoteError)
    return tuple(kinds)


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
    if isinstance(exc, expected()):
        return one_line(exc)
    mlflow = sys.modules.get("mlflow.exceptions")
    if mlflow and isinstance(exc, mlflow.MlflowException):
        return f"MLflow: {one_line(exc.message)[:400]}"
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = f"{type(exc).__name__}: {lines[-1].strip() if lines else 'no message'}"
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
