"""The experiment a sweep writes to, set up with ca-flow's view of its runs table, and links to it."""

from __future__ import annotations

import json

from .names import KIND
from .tracking import resolve_uri, sqlite_path

UI_PORT = 5000  # `ca-flow ui`, as `mlflow ui`

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
