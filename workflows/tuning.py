"""Tune over a sweep's grid points: each dataset's features staged once in Ray's object store, then one
Tune trial per pack of points (grid.packs), each handing its records to the sweep's recorder."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from .errors import error_line
from .grid import SweepSpec, packs
from .point import TrialPoint


def stage_features(splits, spec: SweepSpec, gpus: float, console, check_stop) -> dict:
    """One object ref per dataset's features: trials fetch only their own dataset."""
    import ray

    from clip_adapter.features import FeatureStore

    from .encode import dataset_features

    store = FeatureStore(spec.cache_dir, spec.backbone, spec.pretrained)
    t0 = time.perf_counter()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    encoders = max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else max(1, cpus // 2)
    data = dataset_features(
        splits,
        spec,
        store,
        gpus,
        encoders,
        1 if gpus else max(1, cpus // (2 * encoders)),
        lambda path, reason: console.print(
            f"skipping unreadable image {path}: {reason}", markup=False, highlight=False
        ),
        check_stop,
    )
    console.print(
        f"features  {', '.join(data)}: {store.images_encoded} images encoded, the rest from the "
        f"feature store ({time.perf_counter() - t0:.1f} s)",
        markup=False,
        highlight=False,
    )
    return {name: ray.put(d) for name, d in data.items()}


def run_trials(
    todo: list[TrialPoint], features: dict, recorder, slots: int, spec: SweepSpec, signals, console
) -> dict[str, str]:
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
        tune.with_parameters(
            run_trial,
            features=features,
            recorder=recorder,
            threads=max(1, int(spec.cpus_per_trial)),
            gpu=spec.gpus_per_trial > 0,
        ),
        {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial},
    )
    storage = (
        spec.storage_path
        if "://" in spec.storage_path
        else str(Path(spec.storage_path).expanduser().resolve())
    )
    progress = TrialProgress(len(todo), console)
    tuner = tune.Tuner(
        trainable,
        param_space={"trials": tune.grid_search(packs(todo, spec.pack))},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=slots),
        run_config=tune.RunConfig(
            name=f"ca-flow-{uuid.uuid4().hex[:8]}",
            verbose=0,
            callbacks=[progress],
            storage_path=storage,
            stop=StopOnSignal(),
            failure_config=tune.FailureConfig(max_failures=spec.max_retries),
        ),
    )
    with signals.polling(), progress:
        results = tuner.fit()
    errors = {}
    for r in results:
        if r.config and r.error is not None:  # Tune gave up: retries spent on lost workers or nodes
            errors.update({p.key: error_line(r.error) for p in r.config["trials"]})
        elif r.config and ERROR_RESULT in (r.metrics or {}):  # the trial's own error, not retried
            errors.update({p.key: r.metrics[ERROR_RESULT] for p in r.config["trials"]})
    return errors
