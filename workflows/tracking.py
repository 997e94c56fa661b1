"""MLflow: where runs go, the sweep's parent run, one child run per trial, keyed by the trial."""
from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import logging  # noqa: E402

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema  # noqa: E402
from mlflow.types.schema import Array  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME  # noqa: E402

# "Creating initial MLflow database tables..." is not news for a CLI user.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

SWEEP_ID, TRIAL_KEY, DATASET, RANDOM_WEIGHTS = ("ca_flow.sweep_id", "ca_flow.trial_key",
                                                "ca_flow.dataset", "ca_flow.random_weights")
MODEL_URI = "ca_flow.model_uri"  # models:/m-... of the adapter logged by a trial
MODEL_NAME = "adapter"  # the logged model's name inside each child run
ADAPTER_MODEL_CODE = str(Path(__file__).with_name("adapter_model.py"))


# Images in (a path or base64 bytes per row), top classes out; top_k is a call-time parameter.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score"),
                    ColSpec(Array("string"), "top_labels"), ColSpec(Array("double"), "top_scores")]),
    params=ParamSchema([ParamSpec("top_k", "long", 3)]))


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the fix."""


def resolve_uri(uri: str | None = None) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then ./mlflow.db as an absolute SQLite path."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Relative SQLite paths would resolve inside each Ray trial's own working directory.
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def artifact_location(uri: str) -> str | None:
    """Beside a local SQLite store, in mlartifacts/; a server chooses its own."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None


def check(uri: str, must_exist: bool = False) -> None:
    """Fail with one clear line if the store cannot be reached; writes nothing."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                                f"(mlflow/serve.sh) or pass another --tracking-uri") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise TrackingError(f"folder {folder} for the SQLite tracking store does not exist; create it "
                                f"or pass another --tracking-uri")
        if must_exist and not Path(uri[len("sqlite:///"):]).is_file():
            raise TrackingError(f"no MLflow store at {uri[len('sqlite:///'):]}; run `ca-flow sweep` here first "
                                f"or pass --tracking-uri")


def connect(uri: str, must_exist: bool = False) -> MlflowClient:
    """A client on a store that answers and has its schema; fails with one clear line otherwise."""
    check(uri, must_exist)
    mlflow.set_tracking_uri(uri)  # registry calls resolve models:/ URIs through the global store
    client = MlflowClient(uri)
    try:
        # Creating a fresh SQLite schema from many processes at once races: do it here, once.
        client.search_experiments(max_results=1)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrackingError(f"cannot use MLflow tracking store {uri}: {first}") from None
    return client


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def start_parent(client: MlflowClient, exp_id: str, sweep_id: str, params: dict, random_weights: bool) -> str:
    run = client.create_run(exp_id, run_name=f"sweep-{sweep_id}",
                            tags={SWEEP_ID: sweep_id, RANDOM_WEIGHTS: str(random_weights).lower()})
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def all_runs(client: MlflowClient, exp_id: str, where: str) -> list:
    """Every run matching `where`, page by page (one search returns at most a page)."""
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], where, max_results=5000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def child_runs(client: MlflowClient, exp_id: str, parent_id: str, sweep_id: str,
               trials: list[dict]) -> dict[str, str]:
    """trial key -> run id; runs this parent already has for a key are reused, never duplicated."""
    existing = {r.data.tags[TRIAL_KEY]: r.info.run_id
                for r in all_runs(client, exp_id, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'")}
    runs = {}
    for t in trials:
        if t["key"] in existing:
            runs[t["key"]] = existing[t["key"]]
            continue
        run = client.create_run(exp_id, run_name=t["name"], tags={
            MLFLOW_PARENT_RUN_ID: parent_id, SWEEP_ID: sweep_id, TRIAL_KEY: t["key"],
            DATASET: t["dataset"], RANDOM_WEIGHTS: str(t["weights"] == "random").lower()})
        client.update_run(run.info.run_id, status="SCHEDULED")
        runs[t["key"]] = run.info.run_id
    return runs


def log_trial(uri: str, run_id: str, params: dict, metrics: dict, losses: list[float],
              adapter_dir: str) -> None:
    """Called inside a trial: params, metrics, the loss curve, and the adapter as a pyfunc model."""
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        client, now = MlflowClient(uri), int(time.time() * 1000)
        info = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=ADAPTER_MODEL_CODE, signature=SIGNATURE,
                                       artifacts={"adapter": adapter_dir}, pip_requirements=["ca-flow"])
        points = ([mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()]
                  + [mlflow.entities.Metric("train_loss", float(v), now, epoch) for epoch, v in enumerate(losses)])
        # One write for params, tag and the first metrics: MLflow takes 1000 entries a batch.
        first = 1000 - len(params) - 1
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()],
                         tags=[mlflow.entities.RunTag(MODEL_URI, info.model_uri)], metrics=points[:first])
        for start in range(first, len(points), 1000):
            client.log_batch(run_id, metrics=points[start:start + 1000])


def mark_failed(client: MlflowClient, run_ids: list[str]) -> None:
    for run_id in run_ids:
        if client.get_run(run_id).info.status in ("SCHEDULED", "RUNNING"):
            client.set_terminated(run_id, status="FAILED")


def sweep_runs(client: MlflowClient, experiment: str, sweep_id: str | None = None):
    """(parent run, frame of its trial runs) for a sweep: the latest in the experiment by default."""
    import pandas as pd

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"no experiment {experiment!r} in this tracking store; run `ca-flow sweep` first")
    where = f"tags.`{SWEEP_ID}` = '{sweep_id}'" if sweep_id else f"tags.`{SWEEP_ID}` != ''"
    parents = [r for r in client.search_runs([exp.experiment_id], where, order_by=["attributes.start_time DESC"],
                                             max_results=1000) if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    if not parents:
        raise TrackingError(f"no sweep {sweep_id or ''} in experiment {experiment!r}; see the sweep ids "
                            f"in the MLflow UI or run `ca-flow sweep`".replace("  ", " "))
    parent = parents[0]
    rows = []
    for r in all_runs(client, exp.experiment_id, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'"):
        p, m = r.data.params, r.data.metrics
        rows.append(dict(run_id=r.info.run_id, key=r.data.tags.get(TRIAL_KEY, ""), dataset=p.get("dataset"),
                         method=p.get("method", "clip-adapter"), shots=int(p.get("shots", 0)),
                         seed=int(p.get("seed", 0)), adapter=p.get("adapter", ""),
                         alpha=float(p["alpha"]) if "alpha" in p and "chosen_alpha" not in p else float("nan"),
                         beta=float(p["beta"]) if "beta" in p and "chosen_beta" not in p else float("nan"),
                         val_acc=m.get("val_acc", float("nan")), test_acc=m.get("test_acc", float("nan")),
                         zs_test_acc=m.get("zs_test_acc", float("nan")),
                         status=r.info.status if "test_acc" in m else "FAILED"))
    return parent, pd.DataFrame(rows)
