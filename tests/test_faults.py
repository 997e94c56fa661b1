"""Durable sweeps under faults, on real processes (no mocks): SIGINT, kill -9 of the driver, of a trial
worker, of a worker node, of the tracking server, and `ray job stop` of a submitted sweep.

The scenarios live in benchmarks/faults.py (which also prints them as a table); each runs the `ca-flow`
CLI as a subprocess in its own session, injects its fault, recovers the way the CLI says to, and
returns what it saw. Here every one is held to the same bar, read from the MLflow store afterwards:
one FINISHED run with metrics per grid point under one parent, nothing SCHEDULED or RUNNING, no
duplicate trial keys; and the exit code and last line told the truth at each step. (The last line is
ca-flow's own: a message Ray's driver prints by itself from a background thread, such as a lost node's
raylet log tail, can come after it and is set aside; see faults.own_last_line.)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import faults  # noqa: E402
import procs  # noqa: E402
from conftest import copy_features  # noqa: E402


@pytest.fixture(scope="module")
def features(tmp_path_factory, textile_features) -> Path:
    """One feature store for every scenario (they sample the same images), pre-encoded."""
    return copy_features(textile_features, tmp_path_factory.mktemp("faults") / "features")


@pytest.fixture
def scenario(tmp_path, features):
    """Run a scenario of benchmarks/faults.py here; what it saw is kept in result.json next to its logs."""

    def run(fn):
        r = fn(tmp_path, features)
        (tmp_path / "result.json").write_text(json.dumps(r, indent=1, default=str))
        return r

    return run


def brief(r: dict) -> str:
    """What to read when an assertion fails: the figures and the CLI's own words."""
    keep = {k: v for k, v in r.items() if k not in ("attempts", "after_fault", "before_fault", "job_logs")}
    for k in ("out", "resume_out", "submit_out"):
        if k in keep:
            keep[k] = keep[k][-3000:]
    return "\n".join(f"{k}: {v}" for k, v in keep.items())


def assert_done_line(line: str, sweep_id: str, trials: int) -> None:
    found = faults.DONE.match(line)
    assert found, line
    assert found.groups() == (sweep_id, str(trials), "0"), line


def assert_recovered(r: dict) -> None:
    """The bar every scenario ends at: nothing lost, duplicated or stuck; the store agrees."""
    assert (r["lost"], r["duplicate_runs"], r["stuck_runs"]) == (0, 0, 0), brief(r)
    assert r["finished"] == r["trials"], brief(r)
    procs.assert_sweep_complete(r["store"], r["experiment"], r["trials"])
    assert r["no_traceback"], brief(r)


def assert_closed_honestly(after: dict, parent: str, r: dict) -> None:
    """Right after the fault: the parent says what happened, no run shows FINISHED without metrics."""
    assert after["parents"] == [parent], brief(r)
    assert after["finished_without_metrics"] == 0, after
    assert after["duplicates"] == 0, after


@pytest.mark.slow
def test_sigint_then_resume(scenario):
    r = scenario(faults.sigint)
    after = r["after_fault"]
    # exit 130, one line that counts what MLflow holds and says how to go on
    assert r["rc"] == 130, brief(r)
    found = faults.INTERRUPTED.match(r["last_line"])
    assert found, brief(r)
    assert found.groups() == (str(after["done"]), str(r["trials"]), r["sweep_id"]), brief(r)
    assert 3 <= after["done"] < r["trials"], brief(r)
    # every unfinished run KILLED, the parent KILLED; the trials in flight at the signal ended either way
    assert_closed_honestly(after, "KILLED", r)
    assert after["stuck"] == 0 and set(after["statuses"]) <= {"FINISHED", "KILLED"}, after
    assert r["running_at_fault"], brief(r)
    assert all(after["runs"][k][1] in ("FINISHED", "KILLED") for k in r["running_at_fault"]), after
    # the Parquet was written from MLflow: every grid point, FINISHED only with metrics
    assert r["parquet"] == dict(rows=r["trials"], finished=after["done"], finished_without_metrics=0), r[
        "parquet"
    ]
    # resume: the same parent, only what was not done, the KILLED runs reused
    assert r["resume_rc"] == 0, brief(r)
    assert (
        f"resuming sweep {r['sweep_id']}: {after['done']} of {r['trials']} trials already done, "
        f"{r['trials'] - after['done']} to run"
    ) in r["resume_out"], brief(r)
    assert_done_line(r["resume_last_line"], r["sweep_id"], r["trials"])
    assert all(r["reused"].values()), r["reused"]
    assert_recovered(r)


@pytest.mark.slow
def test_driver_kill9_then_resume(scenario):
    r = scenario(faults.driver_kill)
    after = r["after_fault"]
    assert r["rc"] == -9, brief(r)
    # a dead driver closes nothing: its runs in flight stay RUNNING, and nothing shows done that is not
    assert_closed_honestly(after, "RUNNING", r)
    stuck = [k for k, (_, status, _) in after["runs"].items() if status == "RUNNING"]
    assert r["running_at_fault"] and set(r["running_at_fault"]) <= set(stuck), (r["running_at_fault"], after)
    # its pid is gone: interrupted at once (no waiting out the heartbeat), and resume needs no --force
    assert r["state_after_fault"] == "interrupted", brief(r)
    assert r["resume_rc"] == 0, brief(r)
    assert f"resuming sweep {r['sweep_id']}: {after['done']} of {r['trials']}" in r["resume_out"], brief(r)
    assert_done_line(r["resume_last_line"], r["sweep_id"], r["trials"])
    # the runs the dead driver left RUNNING were picked up again, not duplicated
    assert all(r["reused"].values()), r["reused"]
    assert all(r["attempts"][k] >= 2 for k in stuck), (stuck, r["attempts"])
    assert_recovered(r)


@pytest.mark.slow
def test_trial_worker_kill9_is_retried(scenario):
    r = scenario(faults.worker_kill)
    assert r["killed"].startswith("ray::ImplicitFunc"), brief(r)
    assert r["rc"] == 0, brief(r)
    assert_done_line(r["last_line"], r["sweep_id"], r["trials"])
    # the killed trial, held at its barrier inside its run, was retried by Tune into that run
    # (attempt 2; assert_recovered: no other run appeared for it), and no other trial ran twice
    assert r["retried"] == [r["victim"]], brief(r)
    assert_recovered(r)


@pytest.mark.slow
def test_worker_node_loss(scenario):
    r = scenario(faults.node_loss)
    assert r["killed"], brief(r)
    assert r["rc"] == 0, brief(r)
    assert_done_line(r["last_line"], r["sweep_id"], r["trials"])
    # the trial that was running on the lost node ran again on the head, in the same run; none that had
    # finished before the loss ran again
    assert r["retried"] and not set(r["retried"]) & set(r["finished_at_fault"]), brief(r)
    assert_recovered(r)


@pytest.mark.slow
def test_mlflow_outage_then_resume(scenario):
    r = scenario(faults.mlflow_outage)
    after = r["after_fault"]
    # exit 1, one line: the store went away, what it holds is what finished, how to go on
    assert r["rc"] == 1, brief(r)
    assert r["last_line"].startswith("error: the tracking store stopped answering ("), brief(r)
    assert r["last_line"].endswith(f"; resume with: ca-flow resume {r['sweep_id']}"), brief(r)
    # the parent could not be closed (the store was down): it stays RUNNING, and with its driver gone
    # it reads as interrupted; nothing reads as done without its metrics
    assert_closed_honestly(after, "RUNNING", r)
    assert 3 <= after["done"] < r["trials"], after
    # resume without --force: the driver is dead, so the sweep is interrupted, not running
    assert r["resume_rc"] == 0, brief(r)
    assert_done_line(r["resume_last_line"], r["sweep_id"], r["trials"])
    assert all(r["reused"].values()), r["reused"]
    assert_recovered(r)


@pytest.mark.slow
def test_submit_status_stop_resume(scenario):
    r = scenario(faults.submit_stop)
    sid, job = r["sweep_id"], r["job_id"]
    assert r["anonymous_answer"] == 401, brief(r)  # token auth is on: the job API wants the token
    # submit prints the job and the sweep and returns; status follows the job through MLflow
    assert re.search(rf"submitted job {re.escape(job)}: sweep {sid}\b", r["submit_out"]), brief(r)
    assert r["status_running"]["status"] == "running" and r["status_running"]["finished"] >= 1, brief(r)
    assert r["status_running"]["total"] == r["trials"], brief(r)
    # `ray job stop` is an interruption: runs KILLED, parent KILLED, the job's last line says so
    assert r["stop_rc"] == 0, brief(r)
    after = r["after_fault"]
    assert_closed_honestly(after, "KILLED", r)
    assert after["stuck"] == 0 and after["done"] < r["trials"], after
    assert r["state_after_fault"] == "interrupted", brief(r)
    found = faults.INTERRUPTED.match(r["job_last_line"])
    assert found and found.groups() == (str(after["done"]), str(r["trials"]), sid), brief(r)
    assert re.search(r"was stopped|STOPPED", r["job_status"]), brief(r)
    # resume (driving the same cluster from here) completes it in the same parent
    assert r["resume_rc"] == 0, brief(r)
    assert_done_line(r["resume_last_line"], sid, r["trials"])
    assert all(r["reused"].values()), r["reused"]
    assert_recovered(r)


def test_trial_that_failed_before_its_run_counts_as_failed(tmp_path):
    """What benchmarks/faults.py's mlflow_blip shows on real processes (too long to run here): a
    trial whose every attempt failed before it could make its run (the store did not answer as it
    began) is a failed grid point, not one silently left out of the count; checked here on a real
    store, with the sweep's own close."""
    from workflows import experiments, parent_run, tracking
    from workflows import sweep as s
    from workflows.grid import SweepSpec
    from workflows.trial_runs import create_trial_run

    spec = SweepSpec(
        datasets="textile",
        backbone="ca-flow-tiny",
        pretrained="random",
        shots=[1],
        seeds=[1],
        alphas=[0.2, 0.6],
        methods=["clip-adapter"],
        results_dir=str(tmp_path / "results"),
        experiment="close",
    )
    planned = s.plan(spec)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.connect(uri)
    exp_id = experiments.experiment_id(client, spec.experiment, uri)
    sweep_id = s.new_sweep_id()
    parent_id = parent_run.start(client, exp_id, sweep_id, planned)
    in_flight, never_began = planned.trials
    create_trial_run(client, dict(exp_id=exp_id, parent_id=parent_id, sweep_id=sweep_id), in_flight)
    errors = {t.key: f"store gone ({t.name})" for t in planned.trials}  # Tune gave up on both

    outcome = s.close(s.Sweep(planned, client, exp_id, sweep_id, parent_id, errors=errors))

    assert not outcome.note and outcome.total == 2 and outcome.done == 0
    assert sorted(outcome.failed["key"]) == sorted(errors), outcome.results[
        ["key", "run_id", "status", "error"]
    ]
    assert set(outcome.failed["error"]) == set(errors.values())
    assert client.get_run(parent_id).info.status == "FAILED"
