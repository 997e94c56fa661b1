"""The sweep as a durable job: a parent run that holds its spec, one Tune trial per grid point that
MLflow has no finished run for, and an honest end (FINISHED, FAILED or KILLED, never a silent one).

    plan (datasets, grid; no Ray) -> Ray -> parent run (new, or adopted by `resume`) + heartbeat
    -> features (feature store, Ray Data for what it lacks) -> Tune over the grid points not done
    -> close: unfinished runs KILLED / FAILED, results from MLflow, parent status
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# Per-trial JSON/CSV/TensorBoard files cost seconds per trial; ca-flow logs to MLflow instead.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# ca-flow handles SIGINT itself (stop launching, close the runs, say how to resume).
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
# A failed trial attempt is its run's error tag and one line at the end, not a traceback from Tune.
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")

import pandas as pd  # noqa: E402

from clip_adapter import datasets as ds  # noqa: E402
from clip_adapter.backbone import RANDOM, weights_identity  # noqa: E402

from . import sweeps, tracking  # noqa: E402
from .lifecycle import Heartbeat, Interrupted, Signals  # noqa: E402
from .grid import SweepError, SweepSpec, check_shots, counts, grid, packs  # noqa: E402
from .names import new_sweep_id  # noqa: E402
from .point import TrialPoint  # noqa: E402

WEIGHTS_ID = "ca_flow.weights_id"
NOTE_LIMIT = 8000
NO_RUN = "no run was recorded for this grid point"


@dataclass
class Planned:
    spec: SweepSpec
    splits: list
    skipped: list
    trials: list[TrialPoint]
    weights_id: str
    short: dict = field(default_factory=dict)  # dataset -> {class: train images} under --shots


def plan(spec: SweepSpec) -> Planned:
    """Datasets, shots and the grid, checked; nothing started, nothing written."""
    splits, skipped = ds.load_splits(spec.datasets, spec.data_root)
    short = {s.name: check_shots(spec, s) for s in splits}
    weights_id = weights_identity(spec.pretrained)
    return Planned(spec, splits, skipped, grid(spec, [s.name for s in splits], weights_id), weights_id,
                   {k: v for k, v in short.items() if v})


@dataclass
class Outcome:
    sweep_id: str
    parent_run_id: str
    results: pd.DataFrame     # one row per grid point
    results_path: Path | None
    seconds: float
    tune_seconds: float
    interrupted: int = 0      # the signal that ended it, 0 if none
    note: str = ""            # why it could not close normally (e.g. the tracking store went away)
    browse: str = ""          # the MLflow UI's runs table for this experiment

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def done(self) -> int:
        return int((self.results["status"] == "FINISHED").sum())

    @property
    def failed(self) -> pd.DataFrame:
        """Whatever did not finish: a sweep that was not interrupted leaves nothing else."""
        return self.results[self.results["status"] != "FINISHED"]


def run(spec: SweepSpec, uri: str, address: str | None, console, parent=None,
        sweep_id: str | None = None) -> Outcome:
    """Run (or, with `parent`, resume) a sweep to its end or to an interruption."""
    from .connect import check_resources, connect_ray

    started = time.perf_counter()
    planned = plan(spec)
    for s in planned.skipped:
        console.print(f"skipping {s.name} ({s.path}): {s.reason}", markup=False, highlight=False)
    for name, short in planned.short.items():
        console.print(f"{name}: --allow-fewer-shots: {len(short)} classes have fewer than {max(spec.shots)} train "
                      f"images (fewest {min(short.values())}); runs log the real per-class counts",
                      markup=False, highlight=False)
    tracking.check(uri)
    with Signals() as signals:
        try:
            connect_ray(address)
            signals.reinstall()
            slots = check_resources(spec.cpus_per_trial, spec.gpus_per_trial)
            client = tracking.connect(uri)
            exp_id = tracking.experiment_id(client, spec.experiment, uri)
            if parent is None:
                sweep_id = sweep_id or new_sweep_id()
                parent_id = start(client, exp_id, sweep_id, planned)
            else:
                sweep_id, parent_id = adopt(client, parent, planned)
        except Interrupted as stop:
            return Outcome(sweep_id or "", "", pd.DataFrame(), None, time.perf_counter() - started, 0.0,
                           stop.signum, "interrupted before the sweep started: nothing recorded")
        beat = Heartbeat(uri, parent_id)
        beat.start()
        try:
            return _drive(planned, uri, client, exp_id, sweep_id, parent_id, slots, signals, console, started)
        except Exception as exc:  # e.g. weights that do not load: the sweep's runs end FAILED, saying why
            # Best effort: the error to show is `exc`, even if the store is what failed.
            with contextlib.suppress(Exception):
                tracking.close_unfinished(client, exp_id, parent_id, "FAILED")
            with contextlib.suppress(Exception):
                tracking.fail_trial(client, parent_id, exc)
            raise
        finally:
            beat.stopped.set()


def start(client, exp_id: str, sweep_id: str, planned: Planned) -> str:
    spec = planned.spec
    record = dict(spec.record(), datasets=",".join(s.name for s in planned.splits))  # resume: the same datasets
    params = {f"grid.{k}": ",".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v)
              for k, v in record.items()}
    params["grid.trials"] = len(planned.trials)
    command = " ".join(shlex.quote(a) for a in ["ca-flow", *sys.argv[1:]])
    parent_id = tracking.start_parent(client, exp_id, sweep_id, record, counts(planned.trials), params,
                                      spec.pretrained == RANDOM, describe_grid(planned, command))
    client.set_tag(parent_id, WEIGHTS_ID, planned.weights_id)
    return parent_id


def adopt(client, parent, planned: Planned) -> tuple[str, str]:
    recorded = parent.data.tags.get(WEIGHTS_ID)
    if recorded and recorded != planned.weights_id:
        raise SweepError(f"the weights {planned.spec.pretrained} changed since sweep "
                         f"{parent.data.tags[tracking.SWEEP_ID]} started ({recorded} -> {planned.weights_id}); "
                         f"restore them, or start a new sweep")
    tracking.adopt_parent(client, parent.info.run_id)
    return parent.data.tags[tracking.SWEEP_ID], parent.info.run_id


def describe_grid(planned: Planned, command: str) -> str:
    spec, per = planned.spec, counts(planned.trials)
    lines = [f"**ca-flow sweep** of {len(planned.trials)} trials: {spec.backbone} with {spec.pretrained} weights, "
             f"shots {', '.join(map(str, spec.shots))}, seeds {', '.join(map(str, spec.seeds))}, "
             f"methods {', '.join(spec.methods)}.", "",
             "| dataset | " + " | ".join(spec.methods) + " |", "|---|" + "---|" * len(spec.methods)]
    lines += [f"| {d} | " + " | ".join(str(m.get(x, 0)) for x in spec.methods) + " |" for d, m in per.items()]
    return "\n".join(lines + ["", f"Command: `{command}`", "", "The spec is in `sweep.toml` among this run's artifacts."])


def _drive(planned, uri, client, exp_id, sweep_id, parent_id, slots, signals, console, started) -> Outcome:
    spec = planned.spec
    done = {r.data.tags.get(tracking.TRIAL_KEY) for r in tracking.children(client, exp_id, parent_id)
            if tracking.is_done(r)}
    todo = [p for p in planned.trials if p.key not in done]
    if done:
        console.print(f"resuming sweep {sweep_id}: {len(done)} of {len(planned.trials)} trials already done, "
                      f"{len(todo)} to run", markup=False, highlight=False)
    if spec.pretrained == RANDOM:
        console.print("[yellow]backbone weights: random (seeded) - results say nothing about CLIP; "
                      "for demos and tests only[/yellow]")
    tune_seconds, errors = 0.0, {}
    try:
        _log_spec(client, parent_id, spec, sweep_id)
        if todo:
            from .encode import wait
            from .recorder import drain, start_recorder

            recorder = start_recorder(uri, exp_id, parent_id, sweep_id)  # it starts while features load
            names = {p.dataset for p in todo}
            gpus = 1.0 if spec.gpus_per_trial > 0 else 0.0
            with signals.polling():
                features = _features([s for s in planned.splits if s.name in names], spec, gpus, console,
                                     signals.check)
                wait(recorder.ready.remote(), signals.check)  # up before the first trial hands it a record
            tune_started = time.perf_counter()
            errors = _tune(todo, features, recorder, slots, spec, signals, console)
            errors.update(drain(recorder))  # the records trials handed over are written (or why not)
            tune_seconds = time.perf_counter() - tune_started
    except Interrupted:
        pass
    return close(client, exp_id, parent_id, sweep_id, planned, signals.received, errors,
                 time.perf_counter() - started, tune_seconds)


def _features(splits, spec, gpus, console, check_stop) -> dict:
    """One object ref per dataset's features: trials fetch only their own dataset."""
    import ray

    from clip_adapter.features import FeatureStore

    from .encode import dataset_features

    store = FeatureStore(spec.cache_dir, spec.backbone, spec.pretrained)
    t0 = time.perf_counter()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    encoders = max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else max(1, cpus // 2)
    data = dataset_features(splits, spec, store, gpus, encoders, 1 if gpus else max(1, cpus // (2 * encoders)),
                            lambda path, reason: console.print(f"skipping unreadable image {path}: {reason}",
                                                               markup=False, highlight=False),
                            check_stop)
    console.print(f"features  {', '.join(data)}: {store.images_encoded} images encoded, the rest from the "
                  f"feature store ({time.perf_counter() - t0:.1f} s)", markup=False, highlight=False)
    return {name: ray.put(d) for name, d in data.items()}


def _tune(todo, features, recorder, slots, spec, signals, console) -> dict[str, str]:
    """Run the trials; returns {trial key: error line} for the trials Tune gave up on."""
    from ray import tune

    from .progress import TrialProgress
    from .trial import ERROR_RESULT, run_trial

    class StopOnSignal(tune.Stopper):
        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return bool(signals.received)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, features=features, recorder=recorder,
                             threads=max(1, int(spec.cpus_per_trial)), gpu=spec.gpus_per_trial > 0),
        {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})
    storage = spec.storage_path if "://" in spec.storage_path else str(Path(spec.storage_path).expanduser().resolve())
    progress = TrialProgress(len(todo), console)
    tuner = tune.Tuner(
        trainable, param_space={"trials": tune.grid_search(packs(todo, spec.pack))},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=slots),
        run_config=tune.RunConfig(name=f"ca-flow-{uuid.uuid4().hex[:8]}", verbose=0, callbacks=[progress],
                                  storage_path=storage, stop=StopOnSignal(),
                                  failure_config=tune.FailureConfig(max_failures=spec.max_retries)))
    with signals.polling(), progress:
        results = tuner.fit()
    errors = {}
    for r in results:
        if r.config and r.error is not None:  # Tune gave up: retries spent on lost workers or nodes
            errors.update({p.key: tracking.error_line(r.error) for p in r.config["trials"]})
        elif r.config and ERROR_RESULT in (r.metrics or {}):  # the trial's own error, not retried
            errors.update({p.key: r.metrics[ERROR_RESULT] for p in r.config["trials"]})
    return errors


def _log_spec(client, parent_id: str, spec: SweepSpec, sweep_id: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.toml"
        path.write_text(spec.to_toml())
        client.log_artifact(parent_id, str(path))


def close(client, exp_id, parent_id, sweep_id, planned: Planned, signum: int, errors: dict,
          seconds: float, tune_seconds: float) -> Outcome:
    """Every run ends FINISHED, FAILED or KILLED; results come from what MLflow holds."""
    from mlflow.exceptions import MlflowException

    spec = planned.spec
    try:
        tracking.close_unfinished(client, exp_id, parent_id, "KILLED" if signum else "FAILED", errors)
        results = sweeps.frame(sweep_id, tracking.children(client, exp_id, parent_id), planned.trials)
        # A grid point without a run failed all the same (Tune gave up on it before it had one, or its
        # record never reached the store); after an interruption, it is one that never started.
        lost = (results["run_id"] == "") & (results["key"].isin(list(errors)) if signum else True)
        results.loc[lost, "status"] = "FAILED"
        results.loc[lost, "error"] = results.loc[lost, "key"].map(lambda k: errors.get(k, NO_RUN))
        out_dir = Path(spec.results_dir).expanduser().resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{sweep_id}.parquet"
        results.to_parquet(path, index=False)
        client.log_artifact(parent_id, str(path))
        _summarise(client, parent_id, results)
        _describe_results(client, parent_id, results)
        complete = (results["status"] == "FINISHED").all()
        client.set_terminated(parent_id, status="KILLED" if signum else "FINISHED" if complete else "FAILED")
    except (MlflowException, OSError, tracking.TrackingError) as exc:
        keys = {p.key for p in planned.trials}
        results = pd.DataFrame({"key": sorted(keys), "status": "UNKNOWN"})
        return Outcome(sweep_id, parent_id, results, None, seconds, tune_seconds, signum,
                       f"the tracking store stopped answering ({tracking.error_line(exc)}); what finished is in it, "
                       f"the rest is not recorded")
    return Outcome(sweep_id, parent_id, results, path, seconds, tune_seconds, signum,
                   browse=tracking.ui_link(client.tracking_uri, exp_id))


def _summarise(client, parent_id: str, results: pd.DataFrame) -> None:
    """The parent's summary: best val_acc per dataset and method, and the test_acc of that run."""
    import re

    from mlflow.entities import Metric

    now, points = int(time.time() * 1000), []
    done = results[results["status"] == "FINISHED"]
    for (dataset, method), part in done.groupby(["dataset", "method"]):
        best = sweeps.rank_runs(part).iloc[0]
        key = re.sub(r"[^\w\-. /]", "_", f"{dataset}.{method}")
        points += [Metric(f"best_val_acc.{key}", float(best["val_acc"]), now, 0),
                   Metric(f"best_test_acc.{key}", float(best["test_acc"]), now, 0)]
    for start in range(0, len(points), 1000):
        client.log_batch(parent_id, metrics=points[start:start + 1000])
    client.log_metric(parent_id, "trials_finished", float(len(done)))


def _describe_results(client, parent_id: str, results: pd.DataFrame) -> None:
    """The parent's description: the grid and command (written at the start), then the table."""
    from .report import cells, markdown, paper_table

    note = client.get_run(parent_id).data.tags.get(tracking.NOTE, "").split("\n\n# Results")[0]
    if (results["status"] == "FINISHED").any():
        table = markdown(cells(paper_table(results)), "Results")
        note += "\n\n" + table + "\n\nTest accuracy (%) at the point chosen on validation, mean +- std over seeds."
    if len(note) > NOTE_LIMIT:  # a tag holds 8000 characters; the whole table is in report/ and the Parquet
        note = note[:NOTE_LIMIT - 80] + "\n\n(table cut here: see `ca-flow report` for all of it)"
    client.set_tag(parent_id, tracking.NOTE, note)


def dry_run(spec: SweepSpec) -> dict:
    """What a sweep would do: trials per dataset and method, images to encode and already stored."""
    from clip_adapter.features import FeatureStore

    from .encode import few_shot_items

    planned = plan(spec)
    store = FeatureStore(spec.cache_dir, spec.backbone, spec.pretrained)
    images = {}
    for s in planned.splits:
        train, held = few_shot_items(s, spec)
        pt = store.plan(s.name, s.root, train, spec.augment_views, True)
        ph = store.plan(s.name, s.root, held, 1, False)
        images[s.name] = dict(images=len(train) + len(held), cached=len(train) + len(held) - len(pt.todo) - len(ph.todo)
                              - len(pt.missing) - len(ph.missing), to_encode=len(pt.todo) + len(ph.todo),
                              missing=len(pt.missing) + len(ph.missing))
    return dict(trials=len(planned.trials), tune_trials=len(packs(planned.trials, spec.pack)),
                per_dataset=counts(planned.trials), images=images,
                skipped={s.name: s.reason for s in planned.skipped}, spec=json.loads(json.dumps(spec.record())))
