"""Promotion: the best finished run per dataset (by val_acc) into the Model Registry, never a worse one.

The registered version is a pyfunc built here from the run's adapter files (safetensors + JSON) with
the library's code inside it and pinned requirements: `mlflow models serve` runs it as it is.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .errors import PromoteError
from .names import DATASET, METHOD, PARENT, RANDOM_WEIGHTS, SWEEP_ID
from .run_search import all_runs, is_done
from .trial_runs import ADAPTER_DIR

ADAPTER_MODEL_CODE = str(Path(__file__).with_name("adapter_model.py"))
LIBRARY = str(Path(__file__).resolve().parents[1] / "clip_adapter")
# What the served model imports; pinned to the versions it was promoted with.
REQUIREMENTS = (
    "torch",
    "torchvision",
    "open_clip_torch",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
    "pyarrow",
)


def signature():
    """Images in (base64 bytes per row), top classes out; top_k is a call-time parameter."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("double", "score"),
                ColSpec(Array("string"), "top_labels"),
                ColSpec(Array("double"), "top_scores"),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", "long", 3)]),
    )


def model_name(dataset: str) -> str:
    return f"clip-adapter-{dataset}"


def best_run(runs: list):
    """The run `runs_table.rank_runs` puts first: the one rule the parent's summary and the report use too."""
    from .runs_table import frame, rank_runs

    by_id = {r.info.run_id: r for r in runs}
    return by_id[rank_runs(frame("", runs)).iloc[0]["run_id"]]


def choose(client, experiment: str, datasets: list[str] | None, methods: list[str]) -> dict:
    """dataset -> the best finished trial run of `methods` in the experiment."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise PromoteError(
            f"no experiment {experiment!r} in this tracking store; run `ca-flow sweep` first "
            f"or pass --experiment"
        )
    by_dataset: dict[str, list] = {}
    for run in all_runs(client, [exp.experiment_id], "attributes.status = 'FINISHED'"):
        if PARENT in run.data.tags and is_done(run):
            by_dataset.setdefault(run.data.tags[DATASET], []).append(run)
    if not by_dataset:
        raise PromoteError(f"experiment {experiment!r} has no finished trial runs; run `ca-flow sweep` first")
    missing = [d for d in (datasets or []) if d not in by_dataset]
    if missing:
        raise PromoteError(
            f"no finished runs for dataset {missing[0]} in {experiment!r} "
            f"(have: {', '.join(sorted(by_dataset))})"
        )
    chosen = {}
    for dataset, runs in sorted(by_dataset.items()):
        if datasets and dataset not in datasets:
            continue
        # A run whose choices were made on test (the released protocol, where its code does) is an
        # oracle: never a champion.
        mine = [
            r
            for r in runs
            if r.data.params.get("method", r.data.tags.get(METHOD)) in methods
            and r.data.params.get("selection_split", "val") == "val"
        ]
        if not mine:
            if datasets:
                raise PromoteError(
                    f"dataset {dataset} has no finished {' or '.join(methods)} runs in {experiment!r}; "
                    f"pass --methods naming the methods it has"
                )
            continue
        chosen[dataset] = best_run(mine)
    if not chosen:
        raise PromoteError(f"no finished {' or '.join(methods)} runs in {experiment!r}; pass --methods")
    return chosen


@dataclass
class Decision:
    dataset: str
    name: str
    run: object
    version: str | None  # the champion after this promotion (None for a dry run of a new model)
    action: str  # what happened, in words


def _champion(client, name: str, alias: str):
    import mlflow

    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def decide(client, dataset: str, run, alias: str, force: bool) -> tuple[str, object | None]:
    """('new' | 'same' | 'keep' | 'move', current champion): moves only to a strictly better run."""
    current = _champion(client, model_name(dataset), alias)
    if current is None:
        return "new", current
    if current.run_id == run.info.run_id:
        return "same", current
    if force:
        return "move", current
    if not comparable(run.data.params, current.tags):
        return "keep", current
    return (
        "move" if run.data.metrics["val_acc"] > float(current.tags.get("val_acc", "-1")) else "keep"
    ), current


def comparable(params: dict, champion_tags: dict) -> bool:
    """Runs compare by val_acc only on the same backbone and weights."""
    same = ("backbone", "weights_id")
    return tuple(champion_tags.get(k) for k in same) == tuple(params.get(k) for k in same)


def promote(client, dataset: str, run, alias: str, force: bool = False, dry_run: bool = False) -> Decision:
    name, val = model_name(dataset), run.data.metrics["val_acc"]
    verdict, current = decide(client, dataset, run, alias, force)
    if verdict == "same":
        return Decision(dataset, name, run, current.version, f"already v{current.version}")
    if verdict == "keep":
        params, champion = run.data.params, current.tags
        why = (
            f"val_acc {float(champion.get('val_acc', 'nan')):.4f} >= {val:.4f}"
            if comparable(params, champion)
            else f"{champion.get('backbone')}/{champion.get('weights')} is not comparable with "
            f"{params.get('backbone')}/{params.get('weights')}"
        )
        return Decision(
            dataset, name, run, current.version, f"kept v{current.version} ({why}; --force moves it)"
        )
    if dry_run:
        return Decision(
            dataset,
            name,
            run,
            current.version if current else None,
            "would register" + (f", moving from v{current.version}" if current else ""),
        )
    version = register(client, dataset, run)
    client.set_registered_model_alias(name, alias, version)
    if current is None:
        return Decision(dataset, name, run, version, f"new v{version}")
    return Decision(
        dataset,
        name,
        run,
        version,
        f"moved v{current.version} -> v{version} (val_acc {float(current.tags.get('val_acc', 'nan')):.4f}"
        f" -> {val:.4f}{', forced' if force else ''})",
    )


def register(client, dataset: str, run) -> str:
    """A registry version for `run` (the existing one if it has one): its adapter as a pyfunc."""
    import mlflow

    name = model_name(dataset)
    for existing in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
        if existing.name == name:
            return str(existing.version)
    params, metrics = run.data.params, run.data.metrics
    evidence = dict(
        run_id=run.info.run_id,
        sweep_id=run.data.tags.get(SWEEP_ID, ""),
        val_acc=metrics["val_acc"],
        test_acc=metrics.get("test_acc", ""),
        shots=params["shots"],
        seed=params["seed"],
        method=params.get("method", "clip-adapter"),
        alpha=params.get("alpha", ""),
        beta=params.get("beta", ""),
        adapter=params.get("adapter", ""),
        backbone=params.get("backbone", ""),
        weights=params.get("weights", ""),
        weights_id=params.get("weights_id", ""),
        random_weights=run.data.tags.get(RANDOM_WEIGHTS, ""),
    )
    try:
        client.create_registered_model(name, description=f"CLIP-Adapter for {dataset}, promoted by ca-flow")
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_uri, model_id = log_pyfunc(client, run)
    created = client.create_model_version(
        name,
        model_uri,
        run_id=run.info.run_id,
        model_id=model_id,
        tags={k: str(v) for k, v in evidence.items()},
    )
    return str(created.version)


def log_pyfunc(client, run) -> tuple[str, str]:
    """The run's adapter files as a logged pyfunc model linked to the run (the run itself is untouched)."""
    import logging
    import warnings

    import mlflow

    # "No artifacts found to download" (a new model) and "no input example" (the signature is explicit).
    logging.getLogger("mlflow.store.artifact.artifact_repo").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*input example was not provided.*")
    model = client.create_logged_model(
        run.info.experiment_id, name="adapter", source_run_id=run.info.run_id, model_type="ca-flow-adapter"
    )
    with tempfile.TemporaryDirectory() as tmp:
        adapter = client.download_artifacts(run.info.run_id, ADAPTER_DIR, tmp)
        mlflow.pyfunc.log_model(
            name="adapter",
            model_id=model.model_id,
            python_model=ADAPTER_MODEL_CODE,
            artifacts={"adapter": adapter},
            signature=signature(),
            code_paths=[LIBRARY],
            pip_requirements=requirements(),
            # Declared (off), so that a load's model_config={"image_root": DIR} may set it:
            # MLflow drops load-time keys the logged model does not declare.
            model_config={"image_root": None},
        )
    return f"models:/{model.model_id}", model.model_id


def requirements() -> list[str]:
    """Exact versions of what the model imports; the library itself travels inside the model."""
    return [f"{pkg}=={metadata.version(pkg)}" for pkg in REQUIREMENTS] + [
        f"mlflow=={metadata.version('mlflow')}"
    ]
