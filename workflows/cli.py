"""The `ca-flow` command line: one sub-command per verb.

Arguments are checked before torch, Ray or MLflow load, so a wrong flag answers at once. Every
failure is one line on stderr and a non-zero exit (see errors.py); `--json` puts one JSON document
on stdout and nothing else there.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Optional

import typer

from clip_adapter.methods import NAMES as METHOD_NAMES

from . import cli_results, settings
from .cli_common import ADDRESS, EXPERIMENT, JSON, TABLE_TITLE, URI, console, default, emit, open_store
from .cli_errors import Group, fail
from .names import check_sweep_id

app = typer.Typer(
    cls=Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="CLIP-Adapter few-shot sweeps on Ray Tune, tracked in MLflow.",
)


def _version(value: bool):
    if value:
        from importlib.metadata import version

        typer.echo(f"ca-flow {version('ca-flow')}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version"
    ),
    debug: bool = typer.Option(False, "--debug", help="print tracebacks of unexpected errors"),
):
    ctx.obj = {"debug": debug}


@app.command()
def sweep(
    config: Optional[Path] = typer.Option(
        None, "--config", help="a sweep.toml; flags given here override it"
    ),
    datasets: Optional[str] = typer.Option(
        None, help="all, or NAME[,NAME...] (see `ca-flow datasets`)" + default("datasets")
    ),
    data_root: Optional[str] = typer.Option(
        None, envvar="CA_FLOW_DATA_ROOT", help="folder or URI (file://, s3://) of the datasets"
    ),
    shots: Optional[str] = typer.Option(None, help="shots per class" + default("shots")),
    seeds: Optional[str] = typer.Option(None, help="few-shot sampling seeds" + default("seeds")),
    methods: Optional[str] = typer.Option(None, help=",".join(METHOD_NAMES) + default("methods")),
    alphas: Optional[str] = typer.Option(None, help="visual residual ratios in [0, 1]" + default("alphas")),
    betas: Optional[str] = typer.Option(None, help="text residual ratios in [0, 1]" + default("betas")),
    adapter: Optional[str] = typer.Option(
        None, help="CLIP-Adapter variants: visual,text,both" + default("adapter")
    ),
    backbone: Optional[str] = typer.Option(None, help="open_clip model name" + default("backbone")),
    pretrained: Optional[str] = typer.Option(
        None, help="pretrained tag, local weights file, or random" + default("pretrained")
    ),
    epochs: Optional[int] = typer.Option(None, help="default: CoOp's 50/100/200 by shots"),
    augment_views: Optional[int] = typer.Option(
        None, help="augmented views per train image" + default("augment_views")
    ),
    lr: Optional[float] = typer.Option(None, help="SGD learning rate" + default("lr")),
    batch_size: Optional[int] = typer.Option(None, help="training batch size" + default("batch_size")),
    allow_fewer_shots: Optional[bool] = typer.Option(
        None,
        "--allow-fewer-shots/--no-allow-fewer-shots",
        help="train on what a class has when it has fewer than --shots",
    ),
    experiment: Optional[str] = typer.Option(
        None,
        "--experiment",
        envvar="MLFLOW_EXPERIMENT_NAME",
        help="MLflow experiment" + default("experiment"),
    ),
    cpus_per_trial: Optional[float] = typer.Option(
        None, help="CPUs per trial, fractions allowed" + default("cpus_per_trial")
    ),
    gpus_per_trial: Optional[float] = typer.Option(
        None, help="GPUs per trial, fractions allowed" + default("gpus_per_trial")
    ),
    max_retries: Optional[int] = typer.Option(
        None, help="retries of a trial whose worker or node dies" + default("max_retries")
    ),
    cache_dir: Optional[str] = typer.Option(
        None, help="feature store" + default("cache_dir", str(settings.FEATURES))
    ),
    results_dir: Optional[str] = typer.Option(None, help="per-trial Parquet" + default("results_dir")),
    storage_path: Optional[str] = typer.Option(
        None, help="Tune's own state (shared storage on a cluster)" + default("storage_path")
    ),
    protocol: Optional[str] = typer.Option(
        None,
        help="few-shot (choices on min(K,4) val per class), released "
        "(the released code's recipe), or both" + default("protocol"),
    ),
    pack: Optional[bool] = typer.Option(
        None,
        "--pack/--no-pack",
        help="train the CLIP-Adapter points that differ only "
        "in alpha/beta as one stacked model, one Tune trial" + default("pack", "no-pack"),
    ),
    tracking_uri: Optional[str] = URI,
    address: Optional[str] = ADDRESS,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="show the grid and what is to encode; start nothing"
    ),
    submit: bool = typer.Option(
        False, "--submit", help="run as a Ray job at --address http://HEAD:8265 and return"
    ),
    sweep_id: Optional[str] = typer.Option(None, "--sweep-id", hidden=True),
    as_json: bool = JSON,
):
    """Run one Ray Tune trial per (dataset, method, shots, seed, alpha) and track each in MLflow."""
    flags = {
        k: v
        for k, v in locals().items()
        if k not in ("config", "tracking_uri", "address", "dry_run", "submit", "sweep_id", "as_json")
    }
    from .grid import build_spec

    check_sweep_id(sweep_id)  # the hidden flag `submit` passes: the same form as every sweep id
    spec = build_spec(config, flags)
    from . import tracking

    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_form(uri)
    if dry_run:
        return _dry_run(spec, as_json)
    if submit:
        return _submit(spec, uri, address, as_json)
    from .sweep import run as run_sweep

    _finish(run_sweep(spec, uri, address, console(), sweep_id=sweep_id))


def _dry_run(spec, as_json: bool) -> None:
    from .sweep import dry_run

    plan = dry_run(spec)
    if as_json:
        return emit(plan)
    out = console()
    for name, reason in plan["skipped"].items():
        out.print(f"skipping {name}: {reason}", markup=False, highlight=False)
    for dataset, per in plan["per_dataset"].items():
        img = plan["images"][dataset]
        out.print(
            f"{dataset}: {sum(per.values())} trials ({', '.join(f'{m} {n}' for m, n in per.items())}); "
            f"{img['images']} images, {img['cached']} in the feature store, {img['to_encode']} to encode"
            + (f", {img['missing']} missing" if img["missing"] else ""),
            markup=False,
            highlight=False,
        )
    out.print(
        f"dry run: {plan['trials']} trials (grid points) in {plan['tune_trials']} Tune trials"
        f"{' (--pack)' if plan['spec']['pack'] else ''}; nothing started",
        markup=False,
        highlight=False,
    )


def _submit(spec, uri: str, address: Optional[str], as_json: bool) -> None:
    from .submit import submit
    from .sweep import new_sweep_id

    if not address:
        fail("--submit needs --address http://HEAD:8265 (the cluster's job API)")
    from . import tracking

    tracking.check(uri)
    sweep_id = new_sweep_id()
    job_id = submit(spec, uri, address, sweep_id)
    if as_json:
        return emit(dict(job_id=job_id, sweep_id=sweep_id, tracking_uri=uri))
    typer.echo(
        f"submitted job {job_id}: sweep {sweep_id}\nfollow it:  ca-flow status {sweep_id} --tracking-uri "
        f"{uri}\nstop it:    ray job stop {job_id} --address {address}  (then: ca-flow resume {sweep_id})"
    )


def _finish(outcome) -> None:
    """Tables, then a last line and an exit code that say what happened."""
    from .report import cells, paper_table, rich_tables

    out = console()
    done = (
        outcome.results[outcome.results["status"] == "FINISHED"] if len(outcome.results) else outcome.results
    )
    if not outcome.note and len(done):
        for table in rich_tables(cells(paper_table(outcome.results)), TABLE_TITLE):
            out.print(table)
    if outcome.note:
        where = f"; resume with: ca-flow resume {outcome.sweep_id}" if outcome.sweep_id else ""
        fail(f"{outcome.note}{where}", 128 + outcome.interrupted if outcome.interrupted else 1)
    if outcome.interrupted:
        typer.echo(
            f"interrupted: {outcome.done} of {outcome.total} trials done; resume with: ca-flow resume "
            f"{outcome.sweep_id}",
            err=True,
        )
        raise typer.Exit(128 + outcome.interrupted)
    failed = outcome.failed
    if outcome.browse:
        typer.echo(f"runs: {outcome.browse}")
    typer.echo(
        f"sweep {outcome.sweep_id}: {outcome.total} trials, {len(failed)} failed, {outcome.seconds:.1f} s; "
        f"parent run {outcome.parent_run_id}; results {outcome.results_path}"
    )
    if len(failed):
        lines = [
            f"  {row.dataset}-{row.method}-{row.shots}shot-seed{row.seed} ({row.key}): {row.error or row.status}"
            for row in failed.head(5).itertuples()
        ]
        more = [f"  and {len(failed) - 5} more"] if len(failed) > 5 else []
        typer.echo(
            "\n".join(
                [
                    f"error: {len(failed)} of {outcome.total} trials failed; resume with: ca-flow resume "
                    f"{outcome.sweep_id}",
                    *lines,
                    *more,
                ]
            ),
            err=True,
        )
        raise typer.Exit(1)


@app.command()
def resume(
    sweep_id: Optional[str] = typer.Argument(
        None, help="default: the latest unfinished sweep of --experiment"
    ),
    experiment: Optional[str] = EXPERIMENT,
    tracking_uri: Optional[str] = URI,
    address: Optional[str] = ADDRESS,
    max_retries: Optional[int] = typer.Option(None, help="default: the sweep's own"),
    force: bool = typer.Option(False, "--force", help="resume even if its driver still beats"),
):
    """Run the grid points of a sweep that have no finished run, in the same parent run."""
    from . import runs_table
    from .grid import SweepError, SweepSpec

    if max_retries is not None and max_retries < 0:
        fail(f"--max-retries must be >= 0, got {max_retries}")
    check_sweep_id(sweep_id)
    uri, client = open_store(tracking_uri)
    parent = runs_table.find(client, sweep_id, experiment, unfinished=True)
    sid, state = parent.data.tags[runs_table.SWEEP_ID], runs_table.state(parent)
    if state == "finished":
        fail(f"sweep {sid} is finished: every grid point has a finished run; nothing to resume")
    if state == "running" and not force:
        fail(
            f"sweep {sid} is running (driver {parent.data.tags.get(runs_table.DRIVER, '?')} beats); pass --force to "
            f"resume it anyway, or stop that driver first"
        )
    spec = SweepSpec.from_record(json.loads(parent.data.tags[runs_table.SPEC]))
    if max_retries is not None:
        spec.max_retries = max_retries
    try:
        spec.validate()
    except SweepError as exc:
        fail(f"sweep {sid} cannot resume: {exc}")
    from .sweep import run as run_sweep

    _finish(run_sweep(spec, uri, address, console(), parent=parent))


@app.command("sweeps")
def list_sweeps(
    experiment: Optional[str] = typer.Option(
        None, "--experiment", envvar="MLFLOW_EXPERIMENT_NAME", help="default: every experiment"
    ),
    tracking_uri: Optional[str] = URI,
    as_json: bool = JSON,
):
    """Every sweep in the store: status, trials finished / failed / total, when, how long."""
    from . import runs_table

    _, client = open_store(tracking_uri)
    rows = [runs_table.describe(client, parent) for parent in runs_table.parents(client, experiment)]
    if as_json:
        return emit([{k: v for k, v in row.items() if k != "datasets"} for row in rows])
    from rich.table import Table

    table = Table(title="sweeps")
    for col in ("sweep", "experiment", "status", "finished", "failed", "total", "started", "duration"):
        table.add_column(col)
    for row in rows:
        table.add_row(
            row["sweep_id"],
            row["experiment"],
            row["status"],
            str(row["finished"]),
            str(row["failed"]),
            str(row["total"]),
            row["started"],
            f"{row['seconds']:.0f} s",
        )
    console().print(table)


@app.command()
def status(
    sweep_id: Optional[str] = typer.Argument(None, help="default: the latest sweep"),
    tracking_uri: Optional[str] = URI,
    as_json: bool = JSON,
):
    """One sweep: its status and progress per dataset."""
    from . import runs_table

    check_sweep_id(sweep_id)
    _, client = open_store(tracking_uri)
    row = runs_table.describe(client, runs_table.find(client, sweep_id))
    if as_json:
        return emit(row)
    out = console()
    out.print(
        f"sweep {row['sweep_id']} ({row['experiment']}): {row['status']}, {row['finished']} of {row['total']} "
        f"trials finished, {row['failed']} failed, {row['running']} running; started {row['started']}, "
        f"{row['seconds']:.0f} s",
        markup=False,
        highlight=False,
    )
    for dataset, progress in row["datasets"].items():
        out.print(
            f"  {dataset}: {progress['finished']} / {progress['total']} finished, {progress['failed']} failed",
            markup=False,
            highlight=False,
        )
    if row["status"] in ("interrupted", "failed"):
        out.print(f"resume with: ca-flow resume {row['sweep_id']}", markup=False, highlight=False)


@app.command()
def ui(
    tracking_uri: Optional[str] = URI,
    port: int = typer.Option(5000, "--port", min=1, max=65535, help="where a local store's UI listens"),
):
    """The MLflow UI on the store (a server's own, or `mlflow ui` here until Ctrl-C): the latest sweep's runs."""
    from . import ui as mlflow_ui

    uri, client = open_store(tracking_uri)
    raise typer.Exit(mlflow_ui.serve(client, uri, port, typer.echo))


for verb in (cli_results.report, cli_results.promote, cli_results.predict):
    app.command()(verb)
app.command("datasets")(cli_results.list_datasets)


# torch, Ray and MLflow load about 400,000 objects that live as long as the process. With Python's
# default thresholds (700, 10, 10) the oldest generation is walked about 7 times while they load (1.3 s
# of a sweep's start, measured), and none of it is garbage. Walked 10x less often, a long sweep's
# cyclic garbage is still freed.
GC_THRESHOLD = (700, 10, 100)


def run() -> None:
    """The `ca-flow` command: the app, in a process whose heap is mostly imported modules (GC_THRESHOLD).
    At exit what is left is frozen: the interpreter's last collections would walk all of it again (about
    2 s of every sweep's end) to free memory the OS frees anyway."""
    gc.set_threshold(*GC_THRESHOLD)
    try:
        app()
    finally:
        gc.freeze()


if __name__ == "__main__":
    run()
