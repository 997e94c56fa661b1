"""The `ca-flow` command line: one sub-command per verb."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="CLIP-Adapter few-shot sweeps on Ray Tune, tracked in MLflow.")
# Off a terminal (CI logs, pipes) rich would squeeze tables into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 1000)


TABLE_TITLE = "test accuracy (%) at the point chosen on validation, mean +- std over seeds"


def fail(message: str) -> None:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _list(text: str, kind, flag: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} expects comma-separated {kind.__name__}s, e.g. {flag} {'1,2,4' if kind is int else '0.2,0.6'}; got {text!r}")


def _expected_errors():
    from clip_adapter import BackboneError, DatasetError
    from workflows.promote import PromoteError
    from workflows.sweep import SweepError
    from workflows.tracking import TrackingError

    return (BackboneError, DatasetError, PromoteError, SweepError, TrackingError)


@app.command()
def sweep(
    datasets: str = typer.Option("all", help="all, or NAME[,NAME...] (see `ca-flow datasets`)"),
    data_root: Optional[Path] = typer.Option(None, help="default: $CA_FLOW_DATA_ROOT or ~/.cache/ca-flow/data"),
    shots: str = typer.Option("1,2,4,8,16", help="shots per class"),
    seeds: str = typer.Option("1,2,3", help="few-shot sampling seeds"),
    alphas: str = typer.Option("0.2,0.4,0.6,0.8", help="visual residual ratios, in [0, 1]"),
    betas: str = typer.Option("0.2", help="text residual ratios, in [0, 1] (text and both adapters)"),
    methods: str = typer.Option("clip-adapter,zero-shot",
                                help="clip-adapter,zero-shot,linear-probe,tip-adapter,tip-adapter-f"),
    adapter: str = typer.Option("visual", help="CLIP-Adapter variants: visual,text,both"),
    backbone: str = typer.Option("RN50-quickgelu", help="open_clip model name"),
    pretrained: str = typer.Option("openai", help="pretrained tag, a local weights file, or random"),
    experiment: str = typer.Option("ca-flow", help="MLflow experiment"),
    tracking_uri: Optional[str] = typer.Option(None, help="default: $MLFLOW_TRACKING_URI or ./mlflow.db"),
    address: Optional[str] = typer.Option(None, help="Ray address; default: $RAY_ADDRESS or a new local Ray"),
    cpus_per_trial: float = typer.Option(1.0, help="CPUs per trial (fractions allowed)"),
    gpus_per_trial: float = typer.Option(0.0, help="GPUs per trial (fractions allowed)"),
    epochs: Optional[int] = typer.Option(None, help="default: CoOp's 50/100/200 by shots"),
    augment_views: int = typer.Option(10, help="augmented views cached per train image"),
    lr: float = typer.Option(0.002, help="SGD learning rate"),
    batch_size: int = typer.Option(32, help="training batch size"),
    cache_dir: Path = typer.Option(Path("~/.cache/ca-flow/features"), help="feature cache folder"),
    results_dir: Path = typer.Option(Path("ca-flow-results"), help="where the per-trial Parquet goes"),
    storage_path: str = typer.Option("~/ray_results", help="Tune's state; shared (NFS, s3://) on a multi-node cluster"),
):
    """Run one Ray Tune trial per (dataset, shots, seed, alpha) and track each in MLflow."""
    from workflows.report import cells, paper_table, rich_tables
    from workflows.sweep import SweepSpec, run_sweep

    from clip_adapter.datasets import default_data_root

    spec = SweepSpec(
        datasets=datasets, data_root=(data_root or default_data_root()).expanduser(),
        shots=_list(shots, int, "--shots"), seeds=_list(seeds, int, "--seeds"),
        alphas=_list(alphas, float, "--alphas"), betas=_list(betas, float, "--betas"),
        adapters=_list(adapter, str, "--adapter"), methods=_list(methods, str, "--methods"), backbone=backbone, pretrained=pretrained,
        experiment=experiment, tracking_uri=tracking_uri, address=address,
        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, epochs=epochs,
        augment_views=augment_views, lr=lr, batch_size=batch_size,
        cache_dir=cache_dir.expanduser(), results_dir=results_dir, storage_path=storage_path)
    try:
        result = run_sweep(spec, console)
    except _expected_errors() as exc:
        fail(str(exc))
    for table in rich_tables(cells(paper_table(result.results)), TABLE_TITLE):
        console.print(table)
    console.print(f"sweep {result.sweep_id}: {len(result.results)} trials, {result.failed} failed, "
                  f"{result.seconds:.1f} s; parent run {result.parent_run_id}; results {result.results_path}")
    if result.failed:
        first = result.results[result.results["status"] == "FAILED"].iloc[0]
        fail(f"{result.failed} of {len(result.results)} trials failed; first: {first['key']}: {first['error']}")


@app.command()
def promote(
    experiment: str = typer.Option("ca-flow", help="MLflow experiment to choose from"),
    datasets: Optional[str] = typer.Option(None, help="NAME[,NAME...]; default: every dataset with runs"),
    alias: str = typer.Option("champion", help="registry alias given to the chosen version"),
    tracking_uri: Optional[str] = typer.Option(None, help="default: $MLFLOW_TRACKING_URI or ./mlflow.db"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show the choice, register nothing"),
):
    """Register the best finished run per dataset (by val_acc) as clip-adapter-<dataset>@alias."""
    from workflows import promote as p
    from workflows import tracking

    try:
        uri = tracking.resolve_uri(tracking_uri)
        client = tracking.connect(uri, must_exist=True)
        chosen = p.choose(client, experiment, _list(datasets, str, "--datasets") if datasets else None)
        table = Table(title="dry run: would promote" if dry_run else f"promoted as @{alias}")
        for col in ("dataset", "model", "version", "run", "method", "val_acc", "test_acc", "shots", "seed", "alpha"):
            table.add_column(col)
        for dataset, run in chosen.items():
            version = "-"
            if not dry_run:
                done = p.promote(client, dataset, run, alias)
                version = done.version + ("" if done.new else " (existing)")
            prm, met = run.data.params, run.data.metrics
            table.add_row(dataset, p.model_name(dataset), version, run.info.run_id[:12],
                          prm.get("method", "clip-adapter"), f"{met['val_acc']:.4f}",
                          f"{met.get('test_acc', float('nan')):.4f}", prm["shots"], prm["seed"], prm.get("alpha", "-"))
    except _expected_errors() as exc:
        fail(str(exc))
    console.print(table)


@app.command()
def report(
    experiment: str = typer.Option("ca-flow", help="MLflow experiment"),
    sweep: Optional[str] = typer.Option(None, help="sweep id; default: the latest sweep of the experiment"),
    paper: bool = typer.Option(False, "--paper", help="show the published RN50 numbers and the difference"),
    out: Path = typer.Option(Path("ca-flow-report"), help="folder for table.md, table.csv, figure.png"),
    tracking_uri: Optional[str] = typer.Option(None, help="default: $MLFLOW_TRACKING_URI or ./mlflow.db"),
):
    """The paper's table and figure for a sweep: printed, written to --out, logged on its parent run."""
    from workflows import tracking
    from workflows.report import cells, comparable_to_paper, paper_table, rich_tables, write_report

    try:
        uri = tracking.resolve_uri(tracking_uri)
        client = tracking.connect(uri, must_exist=True)
        parent, frame = tracking.sweep_runs(client, experiment, sweep)
    except _expected_errors() as exc:
        fail(str(exc))
    if frame.empty or not (frame["status"] == "FINISHED").any():
        fail(f"sweep {parent.data.tags.get(tracking.SWEEP_ID)} has no finished trial runs to report")
    sweep_id = parent.data.tags[tracking.SWEEP_ID]
    params = parent.data.params
    why_not = comparable_to_paper(params.get("backbone", ""), params.get("pretrained", "")) if paper else None
    show_paper = paper and why_not is None
    title = f"{TABLE_TITLE} (sweep {sweep_id}, {params.get('backbone')} / {params.get('pretrained')} weights)"
    for table in rich_tables(cells(paper_table(frame), show_paper), title):
        console.print(table)
    if why_not:
        console.print(f"--paper: {why_not}", markup=False, highlight=False)
    paths = write_report(frame, (out / sweep_id).resolve(), title, show_paper)
    for path in paths:
        client.log_artifact(parent.info.run_id, str(path), "report")
    console.print(f"wrote {', '.join(str(p) for p in paths)}; logged under report/ on run {parent.info.run_id}",
                  markup=False, highlight=False)


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="image files to classify"),
    dataset: str = typer.Option(..., help="dataset whose promoted adapter to use"),
    alias: str = typer.Option("champion", help="registry alias"),
    tracking_uri: Optional[str] = typer.Option(None, help="default: $MLFLOW_TRACKING_URI or ./mlflow.db"),
    top_k: int = typer.Option(3, help="classes to show per image"),
):
    """Classify images with the promoted adapter of a dataset."""
    import mlflow
    import pandas as pd
    from PIL import Image, UnidentifiedImageError

    from workflows import tracking
    from workflows.promote import model_name

    for path in images:
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, UnidentifiedImageError) as exc:
            fail(f"cannot read image {path}: {exc}")
    try:
        uri = tracking.resolve_uri(tracking_uri)
        client = tracking.connect(uri, must_exist=True)
        name = model_name(dataset)
        try:
            client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException:
            fail(f"no model {name}@{alias} in {uri}; run `ca-flow promote --datasets {dataset}` first")
        model = mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
    except _expected_errors() as exc:
        fail(str(exc))
    out = model.predict(pd.DataFrame({"image": [str(p.resolve()) for p in images]}), params={"top_k": top_k})
    for path, labels, scores in zip(images, out["top_labels"], out["top_scores"]):
        console.print(f"{path}: " + " | ".join(f"{c} {s:.3f}" for c, s in zip(labels, scores)),
                      markup=False, highlight=False)


@app.command("datasets")
def list_datasets(
    data_root: Optional[Path] = typer.Option(None, help="default: $CA_FLOW_DATA_ROOT or ~/.cache/ca-flow/data"),
):
    """List the datasets found: name, layout, where, classes and image counts."""
    from clip_adapter import datasets as ds

    root = (data_root or ds.default_data_root()).expanduser()
    if data_root is not None and not root.is_dir():
        fail(f"data root {root} does not exist; create it or pass another --data-root")
    table = Table(title=f"datasets (data root {root}{'' if root.is_dir() else ', missing'})")
    for col in ("name", "layout", "location", "classes", "train", "val", "test"):
        table.add_column(col)
    try:
        for found in ds.discover(root):
            split = ds.load(found)
            table.add_row(found.name, found.kind, str(found.path), str(len(split.classnames)),
                          str(len(split.train)), "from train" if split.val_from_train else str(len(split.val)),
                          str(len(split.test)))
    except ds.DatasetError as exc:
        fail(str(exc))
    console.print(table)
    missing = [k for k in ds.REGISTRY.values() if k.folder and not (root / k.folder).exists()]
    for kind in missing:
        console.print(f"not found: {kind.name} (expected {kind.layout})", markup=False, highlight=False)


if __name__ == "__main__":
    app()
