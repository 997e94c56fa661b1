"""Promotion: the best finished run per dataset (chosen on val_acc) into the Model Registry."""
from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from . import tracking


class PromoteError(RuntimeError):
    """Nothing can be promoted as asked; the message names the fix."""


def model_name(dataset: str) -> str:
    return f"clip-adapter-{dataset}"


def finished_trial_runs(client: MlflowClient, exp_id: str) -> list[Run]:
    return [r for r in tracking.all_runs(client, exp_id, "attributes.status = 'FINISHED'")
            if tracking.MODEL_URI in r.data.tags and "val_acc" in r.data.metrics]


def rank_key(run: Run):
    """Best val_acc; ties: more shots, then lower seed, then lower alpha (closer to zero-shot)."""
    p = run.data.params
    val = run.data.metrics["val_acc"]
    return (-(val if val == val else -1.0), -int(p["shots"]), int(p["seed"]), float(p.get("alpha", 0.0)),
            run.info.run_id)


def choose(client: MlflowClient, experiment: str, datasets: list[str] | None = None) -> dict[str, Run]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise PromoteError(f"no experiment {experiment!r} in this tracking store; run `ca-flow sweep` first "
                           f"or pass --experiment")
    by_dataset: dict[str, list[Run]] = {}
    for run in finished_trial_runs(client, exp.experiment_id):
        by_dataset.setdefault(run.data.tags[tracking.DATASET], []).append(run)
    if not by_dataset:
        raise PromoteError(f"experiment {experiment!r} has no finished trial runs; run `ca-flow sweep` first")
    missing = [d for d in (datasets or []) if d not in by_dataset]
    if missing:
        raise PromoteError(f"no finished runs for dataset {missing[0]} in {experiment!r} "
                           f"(have: {', '.join(sorted(by_dataset))})")
    return {d: min(runs, key=rank_key) for d, runs in sorted(by_dataset.items())
            if not datasets or d in datasets}


@dataclass
class Promotion:
    dataset: str
    name: str
    version: str
    run_id: str
    new: bool


def promote(client: MlflowClient, dataset: str, run: Run, alias: str) -> Promotion:
    name = model_name(dataset)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if existing:
        version, new = existing[0].version, False
    else:
        p, m = run.data.params, run.data.metrics
        evidence = dict(run_id=run.info.run_id, sweep_id=run.data.tags.get(tracking.SWEEP_ID, ""),
                        val_acc=m["val_acc"], test_acc=m.get("test_acc", ""), shots=p["shots"],
                        seed=p["seed"], method=p.get("method", "clip-adapter"), alpha=p.get("alpha", ""),
                        beta=p.get("beta", ""), adapter=p.get("adapter", ""),
                        backbone=p.get("backbone", ""), weights=p.get("weights", ""),
                        random_weights=run.data.tags.get(tracking.RANDOM_WEIGHTS, ""))
        try:
            client.create_registered_model(name, description=f"CLIP-Adapter for {dataset}, promoted by ca-flow")
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        model_uri = run.data.tags[tracking.MODEL_URI]
        mv = client.create_model_version(name, model_uri, run_id=run.info.run_id, model_id=model_uri.split("/")[-1],
                                         tags={k: str(v) for k, v in evidence.items()})
        version, new = mv.version, True
    client.set_registered_model_alias(name, alias, version)
    return Promotion(dataset, name, str(version), run.info.run_id, new)
