"""What the `ca-flow` verbs share: their common options, the store they open, how they print.

Nothing here imports torch, Ray or MLflow at import time: a wrong flag answers at once.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from .cli_errors import fail
from .grid import SweepSpec

URI = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="default: ./mlflow.db")
EXPERIMENT = typer.Option(
    None,
    "--experiment",
    envvar="MLFLOW_EXPERIMENT_NAME",
    help="default: the experiment of the latest sweep in the store",
)
ADDRESS = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray address; default: a new local Ray")
JSON = typer.Option(False, "--json", help="one JSON document on stdout")


def console():
    from rich.console import Console

    # Off a terminal (CI logs, pipes) rich would squeeze tables into 80 columns and wrap lines.
    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=not sys.stdout.isatty())


def emit(document) -> None:
    typer.echo(json.dumps(document, indent=2, default=str))


def open_store(uri: Optional[str], must_exist: bool = True):
    """(URI, client) of the tracking store; a wrong URI or a missing store answers before MLflow loads."""
    from . import tracking

    uri = tracking.resolve_uri(uri)
    tracking.check(uri, must_exist)
    return uri, tracking.connect(uri, must_exist=must_exist)


def experiment_or_latest(client, experiment: Optional[str]) -> str:
    """--experiment, else the experiment of the latest sweep in the store."""
    if experiment:
        return experiment
    from . import runs_table

    found = runs_table.parents(client)
    if not found:
        fail(
            "no sweep in this tracking store; run `ca-flow sweep` first, or pass --experiment / --tracking-uri"
        )
    return client.get_experiment(found[0].info.experiment_id).name


TABLE_TITLE = "test accuracy (%) at the point chosen on validation, mean +- std over seeds"


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def default(name: str, shown: str | None = None) -> str:
    """A help string's `[default: ...]`: SweepSpec's default of `name` (or `shown`, as the user writes it)."""
    return f"  \\[default: {shown or _shown(getattr(SweepSpec(), name))}]"
