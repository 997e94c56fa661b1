"""The verbs on what sweeps produced: report, promote, predict; and datasets, what there is to sweep.

workflows/cli.py registers them on the app.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from pathlib import Path
from typing import Optional

import typer

from . import settings
from .cli_common import EXPERIMENT, JSON, TABLE_TITLE, URI, console, emit, experiment_or_latest, open_store
from .cli_errors import fail
from .names import check_sweep_id


def report(
    experiment: Optional[str] = EXPERIMENT,
    sweep: Optional[str] = typer.Option(None, help="sweep id; default: the latest sweep (of --experiment)"),
    paper: bool = typer.Option(False, "--paper", help="show the published RN50 numbers and the difference"),
    out: Path = typer.Option(Path("ca-flow-report"), help="folder for table.md, table.csv, figure.png"),
    tracking_uri: Optional[str] = URI,
    as_json: bool = JSON,
):
    """The paper's table and figure for a sweep: printed, written to --out, logged on its parent run."""
    from . import runs_table
    from .names import SPEC, SWEEP_ID
    from .report import (
        cells,
        comparable_to_paper,
        numbers,
        paper_table,
        rich_tables,
        side_by_side,
        side_by_side_markdown,
        write_report,
    )
    from .run_search import children

    check_sweep_id(sweep)
    _, client = open_store(tracking_uri)
    parent = runs_table.find(client, sweep, experiment)
    sweep_id = parent.data.tags[SWEEP_ID]
    frame = runs_table.frame(sweep_id, children(client, parent.info.experiment_id, parent.info.run_id))
    if not (frame["status"] == "FINISHED").any():
        fail(f"sweep {sweep_id} has no finished trial runs to report; see `ca-flow status {sweep_id}`")
    spec = json.loads(parent.data.tags[SPEC])
    why_not = comparable_to_paper(spec["backbone"], spec["pretrained"]) if paper else None
    show_paper = paper and why_not is None
    title = f"{TABLE_TITLE} (sweep {sweep_id}, {spec['backbone']} / {spec['pretrained']} weights)"
    paths = write_report(frame, (out / sweep_id).resolve(), title, show_paper, compare=paper)
    for path in paths:
        client.log_artifact(parent.info.run_id, str(path), "report")
    if as_json:
        return emit(
            dict(
                sweep_id=sweep_id,
                parent_run_id=parent.info.run_id,
                unit="test accuracy, %",
                paper=why_not or show_paper,
                files=[str(p) for p in paths],
                rows=numbers(frame).to_dict("records"),
                **({"side_by_side": side_by_side(frame, show_paper).to_dict("records")} if paper else {}),
            )
        )
    con = console()
    for table in rich_tables(cells(paper_table(frame), show_paper), title):
        con.print(table)
    if paper:
        con.print(side_by_side_markdown(side_by_side(frame, show_paper)), markup=False, highlight=False)
    if why_not:
        con.print(f"--paper: {why_not}", markup=False, highlight=False)
    con.print(
        f"wrote {', '.join(str(p) for p in paths)}; logged under report/ on run {parent.info.run_id}",
        markup=False,
        highlight=False,
    )


ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$")


def promote(
    experiment: Optional[str] = EXPERIMENT,
    datasets: Optional[str] = typer.Option(None, help="NAME[,NAME...]; default: every dataset with runs"),
    methods: str = typer.Option("clip-adapter", help="methods whose runs may become champion"),
    alias: str = typer.Option("champion", help="registry alias given to the chosen version"),
    tracking_uri: Optional[str] = URI,
    dry_run: bool = typer.Option(False, "--dry-run", help="show the choice, register nothing"),
    force: bool = typer.Option(False, "--force", help="move the alias even to a run that is not better"),
    as_json: bool = JSON,
):
    """Register the best finished run per dataset (by val_acc) as clip-adapter-<dataset>@alias,
    only where it beats the current champion."""
    from clip_adapter.methods import check as check_methods

    chosen_methods = [name.strip() for name in methods.split(",") if name.strip()]
    try:
        check_methods(chosen_methods or [""], " in --methods")
    except ValueError as exc:
        fail(str(exc))
    if not ALIAS.match(alias) or alias == "latest" or re.fullmatch(r"v\d+", alias):
        fail(
            f"--alias {alias!r} is not a registry alias: letters, digits, _ and -, not 'latest' or v<number>"
        )
    from .promote import choose
    from .promote import promote as promote_run

    _, client = open_store(tracking_uri)
    exp = experiment_or_latest(client, experiment)
    wanted = [d.strip() for d in datasets.split(",") if d.strip()] if datasets else None
    decisions = [
        promote_run(client, dataset, run, alias, force, dry_run)
        for dataset, run in choose(client, exp, wanted, chosen_methods).items()
    ]
    rows = [
        dict(
            dataset=decision.dataset,
            model=decision.name,
            alias=alias,
            version=decision.version,
            action=decision.action,
            run_id=decision.run.info.run_id,
            method=decision.run.data.params.get("method"),
            val_acc=decision.run.data.metrics["val_acc"],
            test_acc=decision.run.data.metrics.get("test_acc"),
            shots=int(decision.run.data.params["shots"]),
            seed=int(decision.run.data.params["seed"]),
            alpha=decision.run.data.params.get("alpha"),
        )
        for decision in decisions
    ]
    if as_json:
        return emit(dict(experiment=exp, dry_run=dry_run, promotions=rows))
    from rich.table import Table

    table = Table(title=f"{'dry run: ' if dry_run else ''}@{alias} in {exp} (val_acc, test_acc as fractions)")
    for col in (
        "dataset",
        "model",
        "action",
        "run",
        "method",
        "val_acc",
        "test_acc",
        "shots",
        "seed",
        "alpha",
    ):
        table.add_column(col)
    for row in rows:
        table.add_row(
            row["dataset"],
            row["model"],
            row["action"],
            row["run_id"][:12],
            row["method"],
            f"{row['val_acc']:.4f}",
            f"{row['test_acc']:.4f}",
            str(row["shots"]),
            str(row["seed"]),
            row["alpha"] or "-",
        )
    console().print(table)


def predict(
    images: list[Path] = typer.Argument(..., help="image files to classify"),
    dataset: str = typer.Option(..., help="dataset whose promoted adapter to use"),
    alias: str = typer.Option("champion", help="registry alias"),
    tracking_uri: Optional[str] = URI,
    top_k: int = typer.Option(3, min=1, help="classes to show per image"),
    as_json: bool = JSON,
):
    """Classify images with the promoted adapter of a dataset."""
    from clip_adapter.images import ImageError, decode

    blobs = []
    for path in images:
        try:
            blob = path.read_bytes()
            decode(blob)
        except (OSError, ImageError) as exc:
            fail(f"cannot read image {path}: {getattr(exc, 'strerror', None) or exc}")
        blobs.append(blob)
    import pandas as pd

    import mlflow

    from .promote import model_name

    uri, client = open_store(tracking_uri)
    name = model_name(dataset)
    try:
        client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        fail(
            f"no model {name}@{alias} in {uri}; run `ca-flow promote --datasets {shlex.quote(dataset)}` first"
        )
    model = mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
    # The files travel as their bytes, as they would to `mlflow models serve`: no paths cross over.
    out = model.predict(
        pd.DataFrame({"image": [base64.b64encode(blob).decode() for blob in blobs]}), params={"top_k": top_k}
    )
    rows = [
        dict(
            image=str(path),
            top=[dict(label=label, score=round(float(score), 6)) for label, score in zip(labels, scores)],
        )
        for path, labels, scores in zip(images, out["top_labels"], out["top_scores"])
    ]
    if as_json:
        return emit(dict(model=f"{name}@{alias}", predictions=rows))
    for row in rows:
        typer.echo(
            f"{row['image']}: " + " | ".join(f"{top['label']} {top['score']:.3f}" for top in row["top"])
        )


def list_datasets(
    data_root: Optional[str] = typer.Option(
        None, envvar="CA_FLOW_DATA_ROOT", help=f"default: {settings.DATA_ROOT.default}"
    ),
    as_json: bool = JSON,
):
    """The datasets found: name, layout, where, classes and image counts; and what is not usable, and why."""
    from clip_adapter import datasets

    root = (
        datasets.check_root(data_root)
        if data_root is not None
        else datasets.Location(datasets.default_data_root())
    )
    found, skipped = datasets.discover(root)  # a missing default root still shows the packaged datasets
    rows, broken = [], [dict(name=skip.name, location=str(skip.path), reason=skip.reason) for skip in skipped]
    for dataset in found:
        try:
            split = datasets.load(dataset)
        except datasets.DatasetError as exc:
            broken.append(dict(name=dataset.name, location=str(dataset.path), reason=str(exc)))
            continue
        rows.append(
            dict(
                name=dataset.name,
                layout=dataset.kind,
                location=str(dataset.path),
                classes=len(split.classnames),
                train=len(split.train),
                val=None if split.val_from_train else len(split.val),
                test=len(split.test),
            )
        )
    missing = [
        dict(name=kind.name, expected=kind.layout)
        for kind in datasets.REGISTRY.values()
        if kind.folder and not (root / kind.folder).exists()
    ]
    if as_json:
        return emit(dict(data_root=str(root), datasets=rows, not_usable=broken, not_found=missing))
    from rich.table import Table

    table = Table(title=f"datasets (data root {root}{'' if root.is_dir() else ', missing'})")
    for col in ("name", "layout", "location", "classes", "train", "val", "test"):
        table.add_column(col)
    for row in rows:
        table.add_row(
            row["name"],
            row["layout"],
            row["location"],
            str(row["classes"]),
            str(row["train"]),
            "from train" if row["val"] is None else str(row["val"]),
            str(row["test"]),
        )
    con = console()
    con.print(table)
    for entry in broken:
        con.print(
            f"not usable: {entry['name']} ({entry['location']}): {entry['reason']}",
            markup=False,
            highlight=False,
        )
    for entry in missing:
        con.print(f"not found: {entry['name']} (expected {entry['expected']})", markup=False, highlight=False)
