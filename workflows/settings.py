"""Every environment variable ca-flow reads or sets, with its type, default and why; and its caches.

Nothing is set at import time: `for_tune()` and `for_mlflow()` set their variables where a sweep, or a
process that writes to MLflow, starts. Each only fills in what the environment does not already say.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from clip_adapter.settings import CACHE, DATA_ROOT_VAR


@dataclass(frozen=True)
class EnvVar:
    name: str
    type: type
    default: object
    why: str

    def get(self):
        value = os.environ.get(self.name)
        return self.default if value is None or value == "" else self.type(value)


# -- read by ca-flow -------------------------------------------------------------------------------------
DATA_ROOT = EnvVar(DATA_ROOT_VAR, str, str(CACHE / "data"), "where the datasets are (--data-root)")
HEARTBEAT_S = EnvVar(
    "CA_FLOW_HEARTBEAT_S",
    float,
    30.0,
    "seconds between the driver's beats; 3 missed ones read as an interrupted sweep",
)
TEST_BARRIER = EnvVar("CA_FLOW_TEST_BARRIER", str, None, "a folder where tests hold trials at named points")
TRACKING_URI = EnvVar("MLFLOW_TRACKING_URI", str, None, "the store (--tracking-uri); default ./mlflow.db")
EXPERIMENT_NAME = EnvVar("MLFLOW_EXPERIMENT_NAME", str, None, "the experiment (--experiment)")
RAY_ADDRESS = EnvVar("RAY_ADDRESS", str, None, "the Ray cluster (--address); default a new local Ray")

# -- set by ca-flow, where a sweep or an MLflow writer starts ----------------------------------------------
TUNE = (
    EnvVar(
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS",
        str,
        "1",
        "per-trial JSON/CSV/TensorBoard files cost seconds per trial; ca-flow logs to MLflow instead",
    ),
    EnvVar("RAY_AIR_NEW_OUTPUT", str, "0", "Tune's own progress table off: ca-flow shows its progress bar"),
    EnvVar(
        "TUNE_DISABLE_SIGINT_HANDLER",
        str,
        "1",
        "ca-flow handles SIGINT itself (stop launching, close the runs, say how to resume)",
    ),
    EnvVar(
        "TUNE_PRINT_ALL_TRIAL_ERRORS",
        str,
        "0",
        "a failed attempt is its run's error tag and one line at the end, not a traceback from Tune",
    ),
)
MLFLOW = (
    EnvVar(
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", str, "false", "an adapter's two files need no progress bar"
    ),
    EnvVar("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", str, "true", "ca-flow prints its own link"),
)
UI_JOB_EXECUTION = EnvVar(
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
    str,
    "false",
    "`ca-flow ui` serves runs; MLflow's job runner would only start and warn",
)
JOB_STOP_WAIT_S = EnvVar(
    "RAY_JOB_STOP_WAIT_TIME_S",
    str,
    None,
    "a submitted sweep's grace after `ray job stop` to close its runs (submit.STOP_GRACE_S)",
)

# -- caches ---------------------------------------------------------------------------------------------
FEATURES = CACHE / "features"  # the feature store (--cache-dir)
LOGS = CACHE / "logs"  # tracebacks of unexpected errors


def _fill(variables) -> None:
    for var in variables:
        os.environ.setdefault(var.name, var.default)


def for_tune() -> None:
    """Before a sweep connects to Ray: Tune reads these when it runs, and a local Ray's workers inherit them."""
    _fill(TUNE)


def for_mlflow() -> None:
    """In every process that writes to MLflow (the driver, the recorder), before it writes."""
    _fill(MLFLOW)
