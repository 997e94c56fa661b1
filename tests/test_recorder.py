"""The recorder's contract, on a real Ray and a real MLflow store: a record a trial handed over is
written even when the trial's worker is gone a moment later and the store is slow to answer; a grid
point whose record never arrived fails the sweep instead of passing as "0 failed"."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
import pytest
from mlflow.entities import Metric, Param

from mlflow import MlflowClient
from workflows.point import TrialPoint
from workflows.recorder import Recorder
from workflows.trial import hand_over

ADAPTER = os.urandom(2 * 2**20)  # large enough to travel through the object store, not inline
SOURCE = dict(name="colours", digest="abc123", source="/data/colours", source_type="local")


def point(key: str) -> TrialPoint:
    return TrialPoint(
        key=key,
        name=f"colours-{key}",
        dataset="colours",
        method="clip-adapter",
        shots=1,
        seed=1,
        weights="random",
    )


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("recorder", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp_id).info.run_id
    return uri, client, exp_id, parent


@pytest.mark.slow
def test_a_record_handed_over_is_written_after_its_worker_died(ray_local, store):
    ray = ray_local
    uri, client, exp_id, parent = store

    class SlowStore(Recorder):  # every write waits a second: the trial is long gone when it lands
        def _start(self, *args):
            time.sleep(1.0)
            super()._start(*args)

    recorder = ray.remote(SlowStore).options(num_cpus=0).remote(uri, exp_id, parent, "sweep-1")

    @ray.remote(num_cpus=0, max_restarts=0)
    class Trial:
        def run(self, recorder, t):
            hand_over(recorder.start, t, 1_000)
            hand_over(
                recorder.finish,
                t.key,
                {"shots": 1},
                {"val_acc": 0.5, "test_acc": 0.25},
                [1.0, 0.5],
                {"adapter.safetensors": ADAPTER},
                SOURCE,
                2_000,
            )
            os._exit(0)  # as Tune ends a trial's actor once its trial returned

    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(Trial.remote().run.remote(recorder, point("k1")))
    assert ray.get(recorder.drain.remote()) == {}
    (run,) = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert run.info.status == "FINISHED" and run.info.end_time == 2_000
    assert run.data.metrics == {"val_acc": 0.5, "test_acc": 0.25, "train_loss": 0.5}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1.0, 0.5]
    local = client.download_artifacts(run.info.run_id, "adapter/adapter.safetensors")
    assert open(local, "rb").read() == ADAPTER


def test_a_grid_point_whose_record_never_arrived_fails_the_sweep(store, tmp_path):
    """Close a sweep (no Ray needed) where one of two grid points has a run and the other none."""
    from workflows.grid import SweepSpec
    from workflows.names import SWEEP_ID
    from workflows.sweep import Sweep, SweepPlan, close
    from workflows.trial_runs import create_trial_run

    uri, client, exp_id, parent = store
    client.set_tag(parent, SWEEP_ID, "sweep-1")
    t1, t2 = (replace(point(k), hparams={"alpha": 0.2}) for k in ("k1", "k2"))
    run = create_trial_run(client, dict(exp_id=exp_id, parent_id=parent, sweep_id="sweep-1"), t1, 1_000)
    client.log_batch(
        run,
        params=[
            Param("dataset", "colours"),
            Param("method", "clip-adapter"),
            Param("shots", "1"),
            Param("seed", "1"),
            Param("alpha", "0.2"),
        ],
        metrics=[Metric("val_acc", 1.0, 0, 0), Metric("test_acc", 1.0, 0, 0)],
    )
    client.set_terminated(run, "FINISHED")
    spec = SweepSpec(datasets="colours", results_dir=str(tmp_path / "results"))
    planned = SweepPlan(spec, [], [], [t1, t2], "random")
    outcome = close(Sweep(planned, client, exp_id, "sweep-1", parent))
    assert outcome.done == 1 and list(outcome.failed["key"]) == ["k2"]
    assert outcome.failed.iloc[0]["error"] == "no run was recorded for this grid point"
    assert client.get_run(parent).info.status == "FAILED"
    assert np.isnan(outcome.results.set_index("key").loc["k2", "val_acc"])
