"""The names ca-flow writes into MLflow and reads back: tags, params and metrics.

A name written in one module (a trial's params, the parent's tags) and read in another (the results
table, promote, status) is spelled once, here.
"""

from __future__ import annotations

import re
import time
import uuid

from .errors import TrackingError

# -- tags -------------------------------------------------------------------------------------------
SWEEP_ID, TRIAL_KEY, DATASET, METHOD = (
    "ca_flow.sweep_id",
    "ca_flow.trial_key",
    "ca_flow.dataset",
    "ca_flow.method",
)
RANDOM_WEIGHTS, ATTEMPT, ERROR = "ca_flow.random_weights", "ca_flow.attempt", "ca_flow.error"
SPEC, TOTALS, HEARTBEAT, DRIVER = "ca_flow.spec", "ca_flow.trials", "ca_flow.heartbeat", "ca_flow.driver"
WEIGHTS_ID_TAG = "ca_flow.weights_id"  # the parent's: `resume` refuses weights that changed since
PARENT, NOTE, KIND = "mlflow.parentRunId", "mlflow.note.content", "mlflow.experimentKind"

# -- a trial run's metrics ----------------------------------------------------------------------------
VAL_ACC, TEST_ACC, ZS_TEST_ACC = "val_acc", "test_acc", "zs_test_acc"
TRAIN_LOSS, TRAIN_LOSS_FINAL, TRIAL_SECONDS = "train_loss", "train_loss_final", "trial_seconds"
RESULT_METRICS = (VAL_ACC, TEST_ACC, ZS_TEST_ACC, TRAIN_LOSS_FINAL, TRIAL_SECONDS)  # columns of the table
DONE_METRICS = frozenset({VAL_ACC, TEST_ACC})  # a FINISHED run without them is not done

# -- a trial run's params -----------------------------------------------------------------------------
# A grid point's own fields, logged as they are.
POINT_PARAMS = ("dataset", "method", "shots", "seed", "backbone", "weights", "weights_id", "views")
ADAPTER, ALPHA, BETA = "adapter", "alpha", "beta"  # the method's config; `variant` is logged as `adapter`
PROTOCOL, SELECTION_SPLIT, N_SELECT = "protocol", "selection_split", "n_select"
CHOSEN = "chosen_"  # prefix of what a method chose on val (chosen_alpha: the alpha that run used)


# -- a sweep's id: when it started, and a random suffix -------------------------------------------------
SWEEP_ID_FORM = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")


def new_sweep_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def check_sweep_id(sweep_id: str | None) -> None:
    """A malformed sweep id is an argument error: it answers before MLflow loads."""
    if sweep_id is not None and not SWEEP_ID_FORM.match(sweep_id):
        raise TrackingError(
            f"{sweep_id!r} is not a sweep id (they look like 20261127-101500-1a2b3c); see `ca-flow sweeps`"
        )
