"""A sweep's parent run: what it holds from the start (the spec, the grid, the command) and what it
says at the end (the best run per dataset and method, the results table in its description)."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from clip_adapter.backbone import RANDOM

from .errors import SweepError
from .grid import SweepSpec, counts
from .names import (
    DRIVER,
    HEARTBEAT,
    NOTE,
    RANDOM_WEIGHTS,
    SPEC,
    SWEEP_ID,
    TEST_ACC,
    TOTALS,
    VAL_ACC,
    WEIGHTS_ID_TAG,
)
from .runs_table import rank_runs

NOTE_LIMIT = 8000  # the characters an MLflow tag holds


def start(client, exp_id: str, sweep_id: str, plan) -> str:
    """A new sweep's parent run: its spec (what `resume` rebuilds from), its grid and the command."""
    from mlflow.entities import Param

    spec = plan.spec
    # resume runs over the same datasets
    record = dict(spec.record(), datasets=",".join(split.name for split in plan.splits))
    params = {
        f"grid.{k}": ",".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v)
        for k, v in record.items()
    }
    params["grid.trials"] = len(plan.trials)
    command = " ".join(shlex.quote(a) for a in ["ca-flow", *sys.argv[1:]])
    run = client.create_run(
        exp_id,
        run_name=f"sweep-{sweep_id}",
        tags={
            SWEEP_ID: sweep_id,
            RANDOM_WEIGHTS: str(spec.pretrained == RANDOM).lower(),
            SPEC: json.dumps(record),
            TOTALS: json.dumps(counts(plan.trials)),
            NOTE: describe_grid(plan, command),
            **driver_tags(),
        },
    )
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_tag(run.info.run_id, WEIGHTS_ID_TAG, plan.weights_id)
    return run.info.run_id


def driver_tags() -> dict:
    """Which driver is at work, and that it was alive a moment ago."""
    return {HEARTBEAT: str(int(time.time())), DRIVER: f"{socket.gethostname()}:{os.getpid()}"}


def beat(client, parent_id: str) -> None:
    client.set_tag(parent_id, HEARTBEAT, str(int(time.time())))


def adopt(client, parent, plan) -> tuple[str, str]:
    """(sweep id, parent run id) of a resumed sweep, whose weights must be the ones it started with."""
    recorded = parent.data.tags.get(WEIGHTS_ID_TAG)
    if recorded and recorded != plan.weights_id:
        raise SweepError(
            f"the weights {plan.spec.pretrained} changed since sweep "
            f"{parent.data.tags[SWEEP_ID]} started ({recorded} -> {plan.weights_id}); "
            f"restore them, or start a new sweep"
        )
    from mlflow.entities import RunTag

    client.update_run(parent.info.run_id, status="RUNNING")  # running again, driven from here
    client.log_batch(parent.info.run_id, tags=[RunTag(k, v) for k, v in driver_tags().items()])
    return parent.data.tags[SWEEP_ID], parent.info.run_id


def describe_grid(plan, command: str) -> str:
    spec, per = plan.spec, counts(plan.trials)
    lines = [
        f"**ca-flow sweep** of {len(plan.trials)} trials: {spec.backbone} with {spec.pretrained} weights, "
        f"shots {', '.join(map(str, spec.shots))}, seeds {', '.join(map(str, spec.seeds))}, "
        f"methods {', '.join(spec.methods)}.",
        "",
        "| dataset | " + " | ".join(spec.methods) + " |",
        "|---|" + "---|" * len(spec.methods),
    ]
    lines += [f"| {d} | " + " | ".join(str(m.get(x, 0)) for x in spec.methods) + " |" for d, m in per.items()]
    return "\n".join(
        lines + ["", f"Command: `{command}`", "", "The spec is in `sweep.toml` among this run's artifacts."]
    )


def log_spec(client, parent_id: str, spec: SweepSpec) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.toml"
        path.write_text(spec.to_toml())
        client.log_artifact(parent_id, str(path))


def summarise(client, parent_id: str, results: pd.DataFrame) -> None:
    """The parent's summary: per dataset and method, the val_acc of the best run (rank_runs) and its test_acc."""
    from mlflow.entities import Metric

    now, points = int(time.time() * 1000), []
    done = results[results["status"] == "FINISHED"]
    for (dataset, method), part in done.groupby(["dataset", "method"]):
        best = rank_runs(part).iloc[0]
        key = re.sub(r"[^\w\-. /]", "_", f"{dataset}.{method}")
        points += [
            Metric(f"best_{VAL_ACC}.{key}", float(best[VAL_ACC]), now, 0),
            Metric(f"best_{TEST_ACC}.{key}", float(best[TEST_ACC]), now, 0),
        ]
    for start_at in range(0, len(points), 1000):
        client.log_batch(parent_id, metrics=points[start_at : start_at + 1000])
    client.log_metric(parent_id, "trials_finished", float(len(done)))


def describe_results(client, parent_id: str, results: pd.DataFrame) -> None:
    """The parent's description: the grid and command (written at the start), then the table."""
    from .report import cells, markdown, paper_table

    note = client.get_run(parent_id).data.tags.get(NOTE, "").split("\n\n# Results")[0]
    if (results["status"] == "FINISHED").any():
        table = markdown(cells(paper_table(results)), "Results")
        note += (
            "\n\n"
            + table
            + "\n\nTest accuracy (%) at the point chosen on validation, mean +- std over seeds."
        )
    if len(note) > NOTE_LIMIT:  # the whole table is in report/ and the Parquet
        note = note[: NOTE_LIMIT - 80] + "\n\n(table cut here: see `ca-flow report` for all of it)"
    client.set_tag(parent_id, NOTE, note)
