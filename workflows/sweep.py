"""The sweep as a durable job: a parent run that holds its spec, one Tune trial per grid point that
MLflow has no finished run for, and an honest end (FINISHED, FAILED or KILLED, never a silent one).

    plan (datasets, grid; no Ray) -> Ray -> parent run (new, or adopted by `resume`) + heartbeat
    -> features (feature store, Ray Data for what it lacks) -> Tune over the grid points not done
    -> close: unfinished runs KILLED / FAILED, results from MLflow, parent status
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from clip_adapter import datasets
from clip_adapter.backbone import RANDOM, weights_identity

from . import experiments, parent_run, runs_table, settings, tracking
from .errors import TrackingError, error_line
from .grid import SweepSpec, check_shots, counts, grid, packs
from .lifecycle import Heartbeat, Interrupted, Signals
from .names import TRIAL_KEY, new_sweep_id  # noqa: F401  (new_sweep_id: the sweep's own, for tests)
from .point import TrialPoint
from .run_search import children, is_done
from .trial_runs import close_unfinished, fail_run

NO_RUN = "no run was recorded for this grid point"


@dataclass
class SweepPlan:
    """What a sweep is to do, checked before anything starts."""

    spec: SweepSpec
    splits: list
    skipped: list
    trials: list[TrialPoint]
    weights_id: str
    short: dict = field(default_factory=dict)  # dataset -> {class: train images} under --shots


def plan(spec: SweepSpec) -> SweepPlan:
    """Datasets, shots and the grid, checked; nothing started, nothing written."""
    splits, skipped = datasets.load_splits(spec.datasets, spec.data_root)
    short = {split.name: check_shots(spec, split) for split in splits}
    weights_id = weights_identity(spec.pretrained)
    return SweepPlan(
        spec,
        splits,
        skipped,
        grid(spec, [split.name for split in splits], weights_id),
        weights_id,
        {k: v for k, v in short.items() if v},
    )


@dataclass
class Sweep:
    """One sweep being driven: its plan, where its runs go, and what it has come to so far."""

    plan: SweepPlan
    client: object
    exp_id: str
    sweep_id: str
    parent_id: str
    uri: str = ""
    slots: int = 1  # trials at once
    signals: Signals | None = None
    console: object = None
    started: float = field(default_factory=time.perf_counter)
    signum: int = 0  # the signal that ended it, 0 if none
    errors: dict[str, str] = field(default_factory=dict)  # trial key -> why it has no result
    tune_seconds: float = 0.0

    @property
    def spec(self) -> SweepSpec:
        return self.plan.spec

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)


@dataclass
class Outcome:
    sweep_id: str
    parent_run_id: str
    results: pd.DataFrame  # one row per grid point
    results_path: Path | None
    seconds: float
    tune_seconds: float
    interrupted: int = 0  # the signal that ended it, 0 if none
    note: str = ""  # why it could not close normally (e.g. the tracking store went away)
    browse: str = ""  # the MLflow UI's runs table for this experiment

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


def run(
    spec: SweepSpec, uri: str, address: str | None, console, parent=None, sweep_id: str | None = None
) -> Outcome:
    """Run (or, with `parent`, resume) a sweep to its end or to an interruption."""
    started = time.perf_counter()
    settings.for_tune()
    planned = plan(spec)
    _announce(planned, console)
    tracking.check(uri)
    with Signals() as signals:
        try:
            sweep = _open(planned, uri, address, console, signals, parent, sweep_id)
        except Interrupted as stop:
            return Outcome(
                getattr(stop, "sweep_id", ""),
                "",
                pd.DataFrame(),
                None,
                time.perf_counter() - started,
                0.0,
                stop.signum,
                "interrupted before the sweep started: nothing recorded",
            )
        sweep.started = started
        beat = Heartbeat(uri, sweep.parent_id)
        beat.start()
        try:
            return _drive(sweep)
        except Exception as exc:  # e.g. weights that do not load: the sweep's runs end FAILED, saying why
            _fail(sweep, exc)
            raise
        finally:
            beat.stopped.set()


def _announce(planned: SweepPlan, console) -> None:
    """What the plan leaves out or takes as it is, before anything starts."""
    for skipped in planned.skipped:
        console.print(
            f"skipping {skipped.name} ({skipped.path}): {skipped.reason}", markup=False, highlight=False
        )
    for name, short in planned.short.items():
        console.print(
            f"{name}: --allow-fewer-shots: {len(short)} classes have fewer than {max(planned.spec.shots)} "
            f"train images (fewest {min(short.values())}); runs log the real per-class counts",
            markup=False,
            highlight=False,
        )


def _open(
    planned: SweepPlan, uri: str, address: str | None, console, signals: Signals, parent, sweep_id: str | None
) -> Sweep:
    """Ray, the store, the experiment and the parent run (new, or the resumed sweep's)."""
    from .connect import check_resources, connect_ray

    try:
        connect_ray(address, meanwhile=tracking.load_mlflow)  # MLflow's imports take a second or more
        signals.reinstall()
        slots = check_resources(planned.spec.cpus_per_trial, planned.spec.gpus_per_trial)
        client = tracking.connect(uri)
        exp_id = experiments.experiment_id(client, planned.spec.experiment, uri)
        if parent is None:
            sweep_id = sweep_id or new_sweep_id()
            parent_id = parent_run.start(client, exp_id, sweep_id, planned)
        else:
            sweep_id, parent_id = parent_run.adopt(client, parent, planned)
    except Interrupted as stop:
        stop.sweep_id = sweep_id or ""
        raise
    return Sweep(planned, client, exp_id, sweep_id, parent_id, uri, slots, signals, console)


def _fail(sweep: Sweep, exc: Exception) -> None:
    """Best effort: the error to show is `exc`, even if the store is what failed."""
    with contextlib.suppress(Exception):
        close_unfinished(sweep.client, sweep.exp_id, sweep.parent_id, "FAILED")
    with contextlib.suppress(Exception):
        fail_run(sweep.client, sweep.parent_id, exc)


def _drive(sweep: Sweep) -> Outcome:
    """The sweep's steps, each named; an interruption skips to the close."""
    todo = _todo(sweep)
    try:
        parent_run.log_spec(sweep.client, sweep.parent_id, sweep.spec)
        if todo:
            recorder = _start_recorder(sweep)
            features = _stage_features(sweep, todo)
            _run_trials(sweep, todo, features, recorder)
    except Interrupted:
        pass
    sweep.signum = sweep.signals.received
    return close(sweep)


def _todo(sweep: Sweep) -> list[TrialPoint]:
    """The grid points without a finished run (all of them, for a new sweep)."""
    runs = children(sweep.client, sweep.exp_id, sweep.parent_id)
    done = {r.data.tags.get(TRIAL_KEY) for r in runs if is_done(r)}
    todo = [p for p in sweep.plan.trials if p.key not in done]
    if done:
        sweep.say(
            f"resuming sweep {sweep.sweep_id}: {len(done)} of {len(sweep.plan.trials)} trials already done, "
            f"{len(todo)} to run"
        )
    if sweep.spec.pretrained == RANDOM:
        sweep.console.print(
            "[yellow]backbone weights: random (seeded) - results say nothing about CLIP; "
            "for demos and tests only[/yellow]"
        )
    return todo


def _start_recorder(sweep: Sweep):
    """The recorder starts while features load and Tune starts its trial workers, and nothing waits
    for it: a trial's first hand-over waits until it is up (Ray queues calls to an actor being made)."""
    from .recorder import start_recorder

    return start_recorder(sweep.uri, sweep.exp_id, sweep.parent_id, sweep.sweep_id)


def _stage_features(sweep: Sweep, todo: list[TrialPoint]) -> dict:
    """The features of the datasets `todo` needs, in the object store."""
    from .tuning import stage_features

    names = {p.dataset for p in todo}
    gpus = 1.0 if sweep.spec.gpus_per_trial > 0 else 0.0
    with sweep.signals.polling():
        return stage_features(
            [split for split in sweep.plan.splits if split.name in names],
            sweep.spec,
            gpus,
            sweep.console,
            sweep.signals.check,
        )


def _run_trials(sweep: Sweep, todo: list[TrialPoint], features: dict, recorder) -> None:
    """Tune over `todo`, then the recorder drained: the records trials handed over are written (or why not)."""
    from .recorder import drain
    from .tuning import run_trials

    tune_started = time.perf_counter()
    sweep.errors = run_trials(todo, features, recorder, sweep.slots, sweep.spec, sweep.signals, sweep.console)
    sweep.errors.update(drain(recorder))
    sweep.tune_seconds = time.perf_counter() - tune_started


def close(sweep: Sweep) -> Outcome:
    """Every run ends FINISHED, FAILED or KILLED; results come from what MLflow holds."""
    from mlflow.exceptions import MlflowException

    seconds = time.perf_counter() - sweep.started
    try:
        results = _close_runs(sweep)
        path = _write_results(sweep, results)
        parent_run.summarise(sweep.client, sweep.parent_id, results)
        parent_run.describe_results(sweep.client, sweep.parent_id, results)
        complete = (results["status"] == "FINISHED").all()
        status = "KILLED" if sweep.signum else "FINISHED" if complete else "FAILED"
        sweep.client.set_terminated(sweep.parent_id, status=status)
    except (MlflowException, OSError, TrackingError) as exc:
        results = pd.DataFrame({"key": sorted({p.key for p in sweep.plan.trials}), "status": "UNKNOWN"})
        return Outcome(
            sweep.sweep_id,
            sweep.parent_id,
            results,
            None,
            seconds,
            sweep.tune_seconds,
            sweep.signum,
            f"the tracking store stopped answering ({error_line(exc)}); what finished is in it, "
            f"the rest is not recorded",
        )
    return Outcome(
        sweep.sweep_id,
        sweep.parent_id,
        results,
        path,
        seconds,
        sweep.tune_seconds,
        sweep.signum,
        browse=experiments.ui_link(sweep.client.tracking_uri, sweep.exp_id),
    )


def _close_runs(sweep: Sweep) -> pd.DataFrame:
    """Unfinished runs closed, then the results table, a row per grid point."""
    errors = sweep.errors
    close_unfinished(
        sweep.client, sweep.exp_id, sweep.parent_id, "KILLED" if sweep.signum else "FAILED", errors
    )
    runs = children(sweep.client, sweep.exp_id, sweep.parent_id)
    results = runs_table.frame(sweep.sweep_id, runs, sweep.plan.trials)
    # A grid point without a run failed all the same (Tune gave up on it before it had one, or its
    # record never reached the store); after an interruption, it is one that never started.
    lost = (results["run_id"] == "") & (results["key"].isin(list(errors)) if sweep.signum else True)
    results.loc[lost, "status"] = "FAILED"
    results.loc[lost, "error"] = results.loc[lost, "key"].map(lambda k: errors.get(k, NO_RUN))
    return results


def _write_results(sweep: Sweep, results: pd.DataFrame) -> Path:
    """The table as Parquet in --results-dir, and on the parent run."""
    out_dir = Path(sweep.spec.results_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{sweep.sweep_id}.parquet"
    results.to_parquet(path, index=False)
    sweep.client.log_artifact(sweep.parent_id, str(path))
    return path


def dry_run(spec: SweepSpec) -> dict:
    """What a sweep would do: trials per dataset and method, images to encode and already stored."""
    from clip_adapter.features import FeatureStore

    from .encode import few_shot_items

    planned = plan(spec)
    store = FeatureStore(spec.cache_dir, spec.backbone, spec.pretrained)
    images = {}
    for split in planned.splits:
        items = few_shot_items(split, spec)
        train, evaluated = items.train, items.val + split.test
        plans = (
            store.plan(split.name, split.root, train, spec.augment_views, True),
            store.plan(split.name, split.root, evaluated, 1, False),
        )
        total = len(train) + len(evaluated)
        to_encode, missing = sum(len(p.todo) for p in plans), sum(len(p.missing) for p in plans)
        images[split.name] = dict(
            images=total, cached=total - to_encode - missing, to_encode=to_encode, missing=missing
        )
    return dict(
        trials=len(planned.trials),
        tune_trials=len(packs(planned.trials, spec.pack)),
        per_dataset=counts(planned.trials),
        images=images,
        skipped={skipped.name: skipped.reason for skipped in planned.skipped},
        spec=json.loads(json.dumps(spec.record())),
    )
