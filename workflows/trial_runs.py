"""One MLflow run per trial: created as the trial starts, reopened for a retry or a resume, finished
with its record, failed with its error's last line, or closed with the sweep.

A trial's identity is its grid key. ca-flow, not a Ray callback, owns key -> run (the recorder, see
recorder.py): a trial gets the run its key already has under the parent (an earlier attempt, an
interrupted sweep) or a new one, so retries and resumes never duplicate a run. A run is FINISHED
only after its metrics are written.
"""

from __future__ import annotations

import time

from .errors import error_line
from .names import ATTEMPT, DATASET, ERROR, METHOD, PARENT, RANDOM_WEIGHTS, SWEEP_ID, TRAIN_LOSS, TRIAL_KEY
from .point import TrialPoint
from .run_search import children

ADAPTER_DIR = "adapter"  # the artifact folder of a trial's adapter (safetensors + JSON)


def create_trial_run(client, sweep: dict, point: TrialPoint, start_ms: int | None = None) -> str:
    """A new run for `point` under the sweep's parent (`sweep`: exp_id, parent_id, sweep_id), RUNNING from
    when the trial began, tagged with its key."""
    run = client.create_run(
        sweep["exp_id"],
        start_time=start_ms,
        run_name=point.name,
        tags={
            PARENT: sweep["parent_id"],
            SWEEP_ID: sweep["sweep_id"],
            TRIAL_KEY: point.key,
            DATASET: point.dataset,
            METHOD: point.method,
            RANDOM_WEIGHTS: str(point.weights == "random").lower(),
            ATTEMPT: "1",
        },
    )
    return run.info.run_id


def reopen_trial_run(client, run_id: str, attempt: int, clear_error: bool) -> None:
    """The run a trial already has (an earlier attempt, an interrupted sweep): RUNNING again."""
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, ATTEMPT, str(attempt))
    if clear_error:
        client.delete_tag(run_id, ERROR)


def finish_trial(
    client,
    run_id: str,
    params: dict,
    metrics: dict,
    losses: list[float],
    adapter_dir: str,
    dataset: dict,
    end_ms: int | None = None,
) -> None:
    """The adapter's files, the dataset input, params and metrics in one batch, then FINISHED as of
    when the trial ended (the recorder may write a moment later)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param

    client.log_artifacts(run_id, adapter_dir, ADAPTER_DIR)
    client.log_inputs(run_id, [DatasetInput(Dataset(**dataset), [InputTag("mlflow.data.context", "train")])])
    now = end_ms or int(time.time() * 1000)
    points = [Metric(k, float(v), now, 0) for k, v in metrics.items()] + [
        Metric(TRAIN_LOSS, float(v), now, epoch) for epoch, v in enumerate(losses)
    ]
    first = 1000 - len(params)  # MLflow takes 1000 entries a batch
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()], metrics=points[:first])
    for start in range(first, len(points), 1000):
        client.log_batch(run_id, metrics=points[start : start + 1000])
    client.set_terminated(run_id, status="FINISHED", end_time=now)


def fail_run(client, run_id: str, error: BaseException | str) -> None:
    """FAILED with the error's last line as a tag: a trial's run, or the parent of a sweep that failed."""
    client.set_tag(run_id, ERROR, error_line(error))
    client.set_terminated(run_id, status="FAILED")


def close_unfinished(
    client, exp_id: str, parent_id: str, status: str, errors: dict[str, str] | None = None
) -> int:
    """Every child run still SCHEDULED or RUNNING becomes `status`; returns how many did.

    `errors` (trial key -> last line) tags the failed ones whose trial could not say why itself.
    """
    closed = 0
    for run in children(client, exp_id, parent_id):
        if run.info.status not in ("RUNNING", "SCHEDULED"):
            continue
        key = run.data.tags.get(TRIAL_KEY, "")
        if errors and key in errors and ERROR not in run.data.tags:
            client.set_tag(run.info.run_id, ERROR, errors[key])
        client.set_terminated(run.info.run_id, status=status)
        closed += 1
    return closed
