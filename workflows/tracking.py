"""MLflow as the record of a sweep: the store, the experiment, the parent run, one run per trial.

A trial's identity is its grid key. ca-flow, not a Ray callback, owns key -> run (the recorder, see
recorder.py): a trial gets the run its key already has under the parent (an earlier attempt, an
interrupted sweep) or a new one, so retries and resumes never duplicate a run. A run is FINISHED
only after its metrics are written.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from . import settings
from .errors import TrackingError, first_line, last_line

# The tag names, here too: the modules that read runs find them beside the functions that write them.
from .names import (  # noqa: F401
    ATTEMPT,
    DATASET,
    DONE_METRICS,
    DRIVER,
    ERROR,
    HEARTBEAT,
    KIND,
    METHOD,
    NOTE,
    PARENT,
    RANDOM_WEIGHTS,
    SPEC,
    SWEEP_ID,
    TOTALS,
    TRAIN_LOSS,
    TRIAL_KEY,
)
from .point import TrialPoint

ADAPTER_DIR = "adapter"  # the artifact folder of a trial's adapter (safetensors + JSON)
UI_PORT = 5000  # `ca-flow ui`, as `mlflow ui`
SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")


# A shared view of the runs table (what the UI's Share button stores): the columns a sweep is read by,
# its runs grouped by dataset and method. MLflow's UI opens it from the link `ui_link` prints; without
# it the table shows the parent folded and no param or metric, and a link naming a missing key shows
# an error and the GenAI overview: every experiment ca-flow writes to has it from its first sweep on.
VIEW_KEY = "ca-flow"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW = {
    "selectedColumns": [
        "attributes.`Dataset`",
        "metrics.`val_acc`",
        "metrics.`test_acc`",
        "metrics.`zs_test_acc`",
        "metrics.`trial_seconds`",
        "params.`method`",
        "params.`shots`",
        "params.`seed`",
        "params.`alpha`",
        "params.`adapter`",
    ],
    "groupBy": {
        "aggregateFunction": "average",
        "groupByKeys": [
            {"mode": "param", "groupByData": "dataset"},
            {"mode": "param", "groupByData": "method"},
        ],
    },
}
# The UI's model-training view (not GenAI) and ca-flow's table.
EXPERIMENT_TAGS = {KIND: "custom_model_development", VIEW_TAG: json.dumps(VIEW)}


# -- where runs go ---------------------------------------------------------------------------------


def resolve_uri(uri: str | None = None) -> str:
    """--tracking-uri (or MLFLOW_TRACKING_URI), else ./mlflow.db, SQLite paths made absolute."""
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Relative SQLite paths would resolve inside each Ray trial's own working directory.
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def check_form(uri: str) -> None:
    """Refuse a URI MLflow cannot use, before anything starts; reads nothing."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in SCHEMES:
        raise TrackingError(
            f"tracking URI {uri!r} is not one ca-flow can use; pass sqlite:///path/mlflow.db, "
            f"http://host:5000 (mlflow/serve.sh) or a database URI "
            f"({', '.join(s + '://' for s in SCHEMES[3:])}...)"
        )


def unreachable(url: str, timeout: float) -> str | None:
    """Why the MLflow server at `url` does not answer its /health probe; None when it does."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as answer:
            answer.read()
        return None
    except OSError as exc:  # URLError, HTTPError (an answer other than 2xx) and timeouts are OSErrors
        return str(getattr(exc, "reason", exc))


def check(uri: str, must_exist: bool = False) -> None:
    """Fail with one clear line if the store cannot be reached; writes nothing."""
    check_form(uri)
    if uri.startswith(("http://", "https://")):
        reason = unreachable(uri, timeout=5)
        if reason is not None:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                f"(mlflow/serve.sh) or pass another --tracking-uri"
            )
    db = sqlite_path(uri)
    if db is not None:
        if not db.parent.is_dir():
            raise TrackingError(
                f"folder {db.parent} for the SQLite tracking store does not exist; create it "
                f"or pass another --tracking-uri"
            )
        if must_exist and not db.is_file():
            raise TrackingError(
                f"no MLflow store at {db}; run `ca-flow sweep` here first or pass --tracking-uri"
            )
        if db.is_file() and db.stat().st_size and not db.read_bytes()[:16].startswith(b"SQLite format 3"):
            raise TrackingError(
                f"{db} is not an SQLite database; move it away or pass another --tracking-uri"
            )


@contextmanager
def _schema_lock(uri: str):
    """Creating a fresh SQLite schema from several processes at once races (alembic); take turns."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def connect(uri: str, must_exist: bool = False):
    """A client on a store that answers and has its schema; fails with one clear line otherwise."""
    import logging

    import mlflow
    from mlflow import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating tables..." is no news
    settings.for_mlflow()
    check(uri, must_exist)
    try:
        with _schema_lock(uri):
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(f"cannot use MLflow tracking store {uri}: {first_line(exc)}") from None
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # registry calls resolve models:/ URIs through the global store
    # ...and set_tracking_uri exports it too: the next command in this process (a notebook, a test)
    # would silently take this store for its own default.
    if exported is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = exported
    return client


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment, created or not, set up as EXPERIMENT_TAGS says."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = sqlite_path(uri)
        try:
            return client.create_experiment(
                name, artifact_location=str(db.parent / "mlartifacts") if db else None, tags=EXPERIMENT_TAGS
            )
        except MlflowException as exc:  # another sweep created it meanwhile: use that one
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" or client.get_experiment_by_name(name) is None:
                raise
            exp = client.get_experiment_by_name(name)
    set_up(client, exp)
    return exp.experiment_id


def set_up(client, exp) -> None:
    """EXPERIMENT_TAGS on an experiment made before them (an older ca-flow, another tool)."""
    for key, value in EXPERIMENT_TAGS.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)


def runs_url(base: str, exp_id: str) -> str:
    """The runs table of an experiment in ca-flow's view, on the UI at `base`."""
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs?viewStateShareKey={VIEW_KEY}"


def ui_link(uri: str, exp_id: str) -> str:
    """Where the runs table opens: the server's UI, or the one `ca-flow ui` starts on a local store."""
    if uri.startswith(("http://", "https://")):
        return runs_url(uri, exp_id)
    flag = "" if uri == resolve_uri() else f" --tracking-uri {uri}"
    return f"{runs_url(f'http://127.0.0.1:{UI_PORT}', exp_id)} (open it: ca-flow ui{flag})"


def quoted(value: str) -> str:
    """`value` as an MLflow filter-string literal (MLflow has no escapes: pick the other quote)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"{value!r} holds both kinds of quote, which MLflow search cannot express; rename it")


def all_runs(client, exp_ids: list[str], where: str, order_by: list[str] | None = None) -> list:
    """Every run matching `where`, page by page (one search returns at most a page)."""
    runs, token = [], None
    while True:
        page = client.search_runs(exp_ids, where, max_results=5000, page_token=token, order_by=order_by)
        runs += list(page)
        token = page.token
        if not token:
            return runs


# -- the sweep's parent run --------------------------------------------------------------------------


def start_parent(
    client,
    exp_id: str,
    sweep_id: str,
    record: dict,
    totals: dict,
    params: dict,
    random_weights: bool,
    note: str,
) -> str:
    """The parent run, holding what `resume` needs: the spec and the trials per dataset and method."""
    from mlflow.entities import Param

    run = client.create_run(
        exp_id,
        run_name=f"sweep-{sweep_id}",
        tags={
            SWEEP_ID: sweep_id,
            RANDOM_WEIGHTS: str(random_weights).lower(),
            SPEC: json.dumps(record),
            TOTALS: json.dumps(totals),
            NOTE: note,
            **driver_tags(),
        },
    )
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def driver_tags() -> dict:
    return {HEARTBEAT: str(int(time.time())), DRIVER: f"{socket.gethostname()}:{os.getpid()}"}


def adopt_parent(client, parent_id: str) -> None:
    """A resumed sweep's parent: running again, driven from here."""
    from mlflow.entities import RunTag

    client.update_run(parent_id, status="RUNNING")
    client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in driver_tags().items()])


def beat(client, parent_id: str) -> None:
    client.set_tag(parent_id, HEARTBEAT, str(int(time.time())))


# -- one run per trial -----------------------------------------------------------------------------


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


def error_line(error: BaseException | str) -> str:
    """The cause's last line: what a user reads first in a run, a table or the sweep's exit."""
    return last_line(getattr(error, "cause", None) or error)  # a RayTaskError wraps the trial's own exception


def fail_trial(client, run_id: str, error: BaseException | str) -> None:
    """FAILED with the error's last line as a tag."""
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


def children(client, exp_id: str, parent_id: str) -> list:
    return all_runs(client, [exp_id], f"tags.`{PARENT}` = '{parent_id}'")


def is_done(run) -> bool:
    """Done means FINISHED with its metrics: the only runs a resume skips and a table may show."""
    return run.info.status == "FINISHED" and DONE_METRICS <= set(run.data.metrics)
