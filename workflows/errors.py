"""The errors of the orchestration; all derive from clip_adapter.errors.CaFlowError.

Nothing here imports more than the library's error module: the grid, the connection to Ray and the
job submission raise these without loading each other.
"""

from __future__ import annotations

from clip_adapter.errors import CaFlowError, FinalError, first_line, last_line  # noqa: F401


class SweepError(CaFlowError, ValueError):
    """The sweep cannot run as asked; the message names the fix."""


class TrackingError(CaFlowError, RuntimeError):
    """The tracking store cannot be used; the message names the fix."""


class PromoteError(CaFlowError, RuntimeError):
    """Nothing can be promoted as asked; the message names the fix."""


class NodeError(CaFlowError, RuntimeError):
    """The node cannot run the trial as asked; another node may: Tune retries it."""


class RecorderLost(CaFlowError, RuntimeError):
    """The sweep's recorder died: no trial's record can be kept until `resume` starts another."""


class TrialError(FinalError, RuntimeError):
    """A trial cannot use its data as its grid point asks (no readable image, a split not encoded)."""


def error_line(error: BaseException | str) -> str:
    """The cause's last line: what a user reads first in a run, a table or the sweep's exit."""
    cause = getattr(error, "cause", None) or error  # a RayTaskError wraps the trial's own exception
    # A database store's error (SQLAlchemy, through MLflow) ends with the statement, its parameters and
    # a link; the line that says why comes before them.
    said = str(cause).split("\n[SQL: ", 1)[0]
    return last_line(said) if said.strip() else last_line(cause)
