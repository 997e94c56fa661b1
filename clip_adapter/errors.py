"""The one base of every error ca-flow expects, and how an error reads in one line.

An expected error (bad input, a store or a cluster that does not answer, a trial's own data) is its
message: it names the fix. Where the fix is a command-line flag, the library does not know the flag:
it names a `hint`, and the command line words it (workflows/cli_errors.py).
"""

from __future__ import annotations


class CaFlowError(Exception):
    """An error ca-flow expects; its message names the fix."""

    hint = ""  # what the fix is, for the layer that knows how it is spelled (a flag)

    def __init__(self, message: str = "", hint: str = ""):
        super().__init__(message)
        self.hint = hint


class FinalError(CaFlowError):
    """A trial's own failure (its data, its numbers): another attempt would fail alike, so it is not
    retried (as Ray Tune's AbortTrialExecution)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of `exc` (its type's name if it says nothing): what a message quotes of a cause."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def last_line(exc: BaseException | str, limit: int = 500) -> str:
    """The last non-blank line of `exc` (its type's name if it says nothing): a traceback's own error."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:limit]
