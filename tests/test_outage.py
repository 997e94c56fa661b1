"""A short tracking-store outage, on a real `mlflow server` that is killed and started again: the
recorder's own hand-back (`drain`) and the sweep's close leave every grid point whose record was lost
unfinished, counted failed, and resumable (the points `resume` would run are exactly those)."""

from __future__ import annotations

import procs
import pytest

pytestmark = pytest.mark.slow


def colours_spec(colour_root, tmp_path, **fields):
    """One shot, one seed of CLIP-Adapter on the generated `colours` tree, tiny random backbone."""
    from workflows.grid import SweepSpec

    return SweepSpec(
        datasets="colours",
        data_root=str(colour_root),
        backbone="ca-flow-tiny",
        pretrained="random",
        shots=[1],
        seeds=[1],
        methods=["clip-adapter"],
        results_dir=str(tmp_path / "results"),
        **fields,
    )


def test_points_whose_record_the_store_lost_are_failed_and_resumable(tmp_path, colour_root, monkeypatch):
    import mlflow
    from workflows import experiments, parent_run
    from workflows import sweep as s
    from workflows.names import TRIAL_KEY
    from workflows.recorder import Recorder
    from workflows.run_search import children, is_done

    spec = colours_spec(colour_root, tmp_path, alphas=[0.2, 0.4, 0.6], experiment="outage")
    planned = s.plan(spec)
    done, cut_short, never_began = planned.trials  # finished; started before the outage; began during it
    db, artifacts, logs = tmp_path / "m.db", tmp_path / "artifacts", tmp_path / "logs"
    logs.mkdir()
    env = procs.clean_env(tmp_path)
    port = procs.free_port()

    def finish(rec, t):
        rec.finish(
            t.key,
            dict(shots=1, seed=1, alpha=t.hparams["alpha"]),
            dict(val_acc=0.5, test_acc=0.4),
            [0.9, 0.7],
            {"adapter.json": b"{}"},
            dict(name="colours", digest="d", source="s", source_type="local"),
            1,
        )

    with procs.mlflow_server(db, artifacts, logs, env, tmp_path, port=port) as (uri, server):
        client = mlflow.MlflowClient(uri)
        exp_id = experiments.experiment_id(client, spec.experiment, uri)
        sweep_id = s.new_sweep_id()
        parent_id = parent_run.start(client, exp_id, sweep_id, planned)
        rec = Recorder(uri, exp_id, parent_id, sweep_id)
        rec.start(done, 1)
        finish(rec, done)
        rec.start(cut_short, 1)
        assert rec.drain() == {}  # written by the recorder's thread before the store goes away
        # One quick try per request (MLflow's default retries for minutes): the outage is seconds long.
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
        server.stop(graceful_s=1)
        procs.kill_session(server.pid)
        finish(rec, cut_short)  # its result is lost
        rec.start(never_began, 1)  # its run is never made
        finish(rec, never_began)
        unwritten = rec.drain()
    assert set(unwritten) == {cut_short.key, never_began.key}, unwritten
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")  # the store is back: MLflow's own patience again
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")

    with procs.mlflow_server(db, artifacts, logs, env, tmp_path, port=port) as (uri, _):
        client = mlflow.MlflowClient(uri)
        # Tune saw every trial succeed: what failed is only what the recorder hands back
        outcome = s.close(s.Sweep(planned, client, exp_id, sweep_id, parent_id, errors=dict(unwritten)))
        assert not outcome.note and (outcome.total, outcome.done) == (3, 1)
        assert sorted(outcome.failed["key"]) == sorted([cut_short.key, never_began.key])
        by_key = outcome.results.set_index("key")
        assert by_key.loc[cut_short.key, "error"].startswith("result not recorded: ")
        assert by_key.loc[never_began.key, "error"] == "start not recorded: the tracking store is unreachable"
        runs = {r.data.tags[TRIAL_KEY]: r for r in children(client, exp_id, parent_id)}
        assert runs[done.key].info.status == "FINISHED" and is_done(runs[done.key])
        assert runs[cut_short.key].info.status == "FAILED" and not is_done(runs[cut_short.key])
        assert never_began.key not in runs
        assert client.get_run(parent_id).info.status == "FAILED"
        # resume runs exactly the two (the rule _drive applies: a point is done only with a done run)
        assert {k for k, r in runs.items() if is_done(r)} == {done.key}

        # the recorder itself lost (drain gave nothing): the point without a run is still no success
        outcome = s.close(s.Sweep(planned, client, exp_id, sweep_id, parent_id))
        assert sorted(outcome.failed["key"]) == sorted([cut_short.key, never_began.key])


def test_a_sweep_whose_records_the_store_refuses_fails_them_saying_why(tmp_path, colour_root, ray_local):
    """The whole path, not the recorder alone: every trial trains, but the store refuses its results
    (an SQLite trigger, as a quota or a constraint would), so no point is done, each run is FAILED with
    the recorder's own reason, and the sweep counts them failed."""
    import io
    import sqlite3

    from rich.console import Console

    from workflows import sweep as s
    from workflows import tracking

    db = tmp_path / "m.db"
    tracking.connect(f"sqlite:///{db}")  # the schema, then the trigger on its metrics table
    with sqlite3.connect(db) as store:
        store.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON metrics WHEN NEW.key = 'val_acc' "
            "BEGIN SELECT RAISE(ABORT, 'this store takes no val_acc'); END"
        )
    spec = colours_spec(
        colour_root,
        tmp_path,
        alphas=[0.2, 0.4],
        epochs=1,
        experiment="refused",
        cache_dir=str(tmp_path / "cache"),
        storage_path=str(tmp_path / "ray_results"),
    ).validate()
    outcome = s.run(spec, f"sqlite:///{db}", None, Console(file=io.StringIO()))
    assert (outcome.total, outcome.done, len(outcome.failed)) == (2, 0, 2), outcome.results
    errors = outcome.failed["error"].tolist()
    assert all(e.startswith("result not recorded: ") and "takes no val_acc" in e for e in errors), errors
