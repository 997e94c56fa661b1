"""The MLflow UI without a browser: what every experiment ca-flow writes to holds from its first sweep
on, the link a sweep prints, and `ca-flow ui`'s answers to what it cannot do.
(tests/test_browser.py opens the pages in Chromium.)"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from procs import clean_env, run_cli

import mlflow
from workflows import experiments, tracking


@pytest.fixture
def client(tmp_path):
    return tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")


def assert_set_up(exp) -> None:
    """The UI's model-training view, and ca-flow's view of the runs table under the key the link names."""
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.ca-flow"])
    assert {
        "metrics.`val_acc`",
        "metrics.`test_acc`",
        "params.`shots`",
        "params.`seed`",
        "attributes.`Dataset`",
    } <= set(view["selectedColumns"])
    assert [k["groupByData"] for k in view["groupBy"]["groupByKeys"]] == ["dataset", "method"]


def test_a_new_experiment_has_the_view_the_link_names(client, tmp_path):
    exp_id = experiments.experiment_id(client, "first", client.tracking_uri)
    assert_set_up(client.get_experiment(exp_id))


def test_an_experiment_made_elsewhere_or_with_an_older_view_gets_it(client):
    bare = client.create_experiment("bare")
    older = client.create_experiment(
        "older",
        tags={"mlflow.sharedViewState.ca-flow": json.dumps({"selectedColumns": ["metrics.`val_acc`"]})},
    )
    for exp_id in (bare, older):
        assert (
            experiments.experiment_id(client, client.get_experiment(exp_id).name, client.tracking_uri)
            == exp_id
        )
        assert_set_up(client.get_experiment(exp_id))


def test_the_printed_link_names_the_view_and_how_to_open_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert experiments.ui_link(here, "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=ca-flow (open it: ca-flow ui)"
    )
    other = "sqlite:////elsewhere/mlflow.db"
    assert experiments.ui_link(other, "7").endswith(f"(open it: ca-flow ui --tracking-uri {other})")
    assert experiments.ui_link("http://mlflow:5000/", "7") == (
        "http://mlflow:5000/#/experiments/7/runs?viewStateShareKey=ca-flow"
    )


@pytest.mark.slow
def test_ui_on_a_busy_port_or_a_store_without_sweeps_says_so(tmp_path):
    env = clean_env(tmp_path / "home")
    (tmp_path / "home").mkdir()
    mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # a store, no sweep
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(["ui", "--port", str(port)], env, tmp_path, timeout=120)
    assert done.returncode == 1 and not done.stdout, done.stdout + done.stderr
    assert done.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is in use (another MLflow UI?); pass --port with a free one"
    ), done.stderr
    done = run_cli(["ui", "--port", str(port)], env, tmp_path, timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == (
        "error: no sweep in this tracking store; run `ca-flow sweep` first, or pass --tracking-uri"
    ), done.stderr
    done = run_cli(["ui"], env, tmp_path / "home", timeout=120)
    assert done.returncode == 1 and done.stderr.strip().startswith("error: no MLflow store at "), done.stderr


def test_ui_takes_the_store_as_every_verb_does_and_a_port():
    from typer.main import get_command

    from workflows.cli import app

    params = {p.name: p for p in get_command(app).commands["ui"].params}
    assert params["tracking_uri"].envvar == "MLFLOW_TRACKING_URI" and params["port"].default == 5000
    done = run_cli(["ui", "--port", "0"], clean_env(Path("/nonexistent")), Path.cwd(), timeout=60)
    assert done.returncode == 2 and "Invalid value for '--port'" in done.stderr, done.stderr
