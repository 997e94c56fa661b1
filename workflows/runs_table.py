"""Reading the record: which sweeps exist, what state each is in, and its trials as a table.

A sweep's state comes from its parent run and the driver's heartbeat:
    running      RUNNING, and its driver beat recently (and, on this host, its process is alive)
    interrupted  KILLED, or RUNNING with a silent driver (killed, lost with its machine)
    submitted    SCHEDULED: sent as a Ray job whose driver has not started yet
    finished     FINISHED: every grid point has a FINISHED run with metrics
    failed       FAILED: some trials failed after their retries (resume reruns them)
"""

from __future__ import annotations

import json
import os
import socket
import time

import pandas as pd

from clip_adapter.protocol import selection_split

from . import settings
from .errors import TrackingError
from .names import (
    ADAPTER,
    ALPHA,
    BETA,
    CHOSEN,
    DATASET,
    DRIVER,
    ERROR,
    HEARTBEAT,
    METHOD,
    PARENT,
    PROTOCOL,
    RESULT_METRICS,
    SELECTION_SPLIT,
    SPEC,
    SWEEP_ID,
    TEST_ACC,
    TOTALS,
    TRIAL_KEY,
    VAL_ACC,
    check_sweep_id,
)
from .point import FEW_SHOT, TrialPoint
from .run_search import all_runs, children, is_done, quoted

RESULT_COLUMNS = [
    "sweep_id",
    "key",
    "run_id",
    "dataset",
    "method",
    "shots",
    "seed",
    ADAPTER,
    ALPHA,
    BETA,
    *RESULT_METRICS,
    "status",
    "error",
    PROTOCOL,
    SELECTION_SPLIT,
]


def heartbeat_seconds() -> float:
    return settings.HEARTBEAT_S.get()


def driver_alive(parent) -> bool:
    """Is the parent's driver beating? On this host its pid is checked too: a kill -9 shows at once."""
    tags = parent.data.tags
    beat = float(tags.get(HEARTBEAT, "0"))
    if time.time() - beat > 3 * heartbeat_seconds():
        return False
    host, _, pid = tags.get(DRIVER, "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return True


def state(parent) -> str:
    status = parent.info.status
    if status == "RUNNING":
        return "running" if driver_alive(parent) else "interrupted"
    return {"FINISHED": "finished", "FAILED": "failed", "KILLED": "interrupted", "SCHEDULED": "submitted"}[
        status
    ]


def parents(client, experiment: str | None = None, sweep_id: str | None = None) -> list:
    """Sweep parent runs, newest first: of one experiment or all, of one sweep id or every one."""
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise TrackingError(
                f"no experiment {experiment!r} in this tracking store; run `ca-flow sweep` first "
                f"or pass another --experiment"
            )
        exp_ids = [exp.experiment_id]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    where = f"tags.`{SWEEP_ID}` = {quoted(sweep_id)}" if sweep_id else f"tags.`{SPEC}` != ''"
    runs = all_runs(client, exp_ids, where, order_by=["attributes.start_time DESC"])
    return [r for r in runs if PARENT not in r.data.tags and SPEC in r.data.tags]


def find(client, sweep_id: str | None, experiment: str | None = None, unfinished: bool = False):
    """One sweep's parent run: `sweep_id` in any experiment, else the latest (unfinished) one."""
    check_sweep_id(sweep_id)
    found = parents(client, None if sweep_id else experiment, sweep_id)
    if unfinished and not sweep_id:
        found = [p for p in found if state(p) != "finished"]
    if not found:
        what = f"sweep {sweep_id}" if sweep_id else ("unfinished sweep" if unfinished else "sweep")
        where = f" in experiment {experiment!r}" if experiment and not sweep_id else ""
        raise TrackingError(f"no {what}{where} in this tracking store; see `ca-flow sweeps`")
    return found[0]


def totals(parent) -> dict[str, dict[str, int]]:
    return json.loads(parent.data.tags.get(TOTALS, "{}"))


def progress(parent, runs: list) -> dict:
    """Counts for `sweeps` and `status`: finished / failed / total, overall and per dataset."""
    per = {d: dict(finished=0, failed=0, running=0, total=sum(m.values())) for d, m in totals(parent).items()}
    for run in runs:
        row = per.setdefault(run.data.tags.get(DATASET, "?"), dict(finished=0, failed=0, running=0, total=0))
        if is_done(run):
            row["finished"] += 1
        elif run.info.status in ("FAILED", "KILLED"):
            row["failed"] += 1
        elif run.info.status == "RUNNING":
            row["running"] += 1
    overall = {k: sum(r[k] for r in per.values()) for k in ("finished", "failed", "running", "total")}
    return dict(overall, datasets=per)


def describe(client, parent) -> dict:
    """One sweep as `sweeps` and `status` show it (JSON-ready)."""
    info = parent.info
    runs = children(client, info.experiment_id, info.run_id)
    prog = progress(parent, runs)
    end = info.end_time or (
        None
        if state(parent) == "running"
        else max(
            [r.info.end_time or 0 for r in runs]
            + [int(float(parent.data.tags.get(HEARTBEAT, 0)) * 1000), info.start_time]
        )
    )
    started = info.start_time / 1000
    return dict(
        sweep_id=parent.data.tags[SWEEP_ID],
        experiment=client.get_experiment(info.experiment_id).name,
        status=state(parent),
        finished=prog["finished"],
        failed=prog["failed"],
        running=prog["running"],
        total=prog["total"],
        started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        seconds=round(((end / 1000) if end else time.time()) - started, 1),
        parent_run_id=info.run_id,
        driver=parent.data.tags.get(DRIVER, ""),
        datasets=prog["datasets"],
    )


def frame(sweep_id: str, runs: list, trials: list[TrialPoint] | None = None) -> pd.DataFrame:
    """One row per trial run; with `trials` (the grid), grid points without a run too, SCHEDULED.

    A run shows FINISHED only with its metrics; anything else shows its own status and error.
    """
    points = {p.key: p for p in trials or []}  # a run that failed before logging params: its grid point
    rows = [_run_row(r, points.get(r.data.tags.get(TRIAL_KEY))) for r in runs]
    seen = {row["key"] for row in rows}
    rows += [_point_row(p) for p in trials or [] if p.key not in seen]
    out = pd.DataFrame(rows, columns=RESULT_COLUMNS[1:])
    out.insert(0, "sweep_id", sweep_id)
    if trials:  # the grid's points only (a run whose key left the grid is not this sweep's any more)
        out = out[out["key"].isin(set(points))]
    return out.sort_values(
        ["dataset", "method", "shots", "seed", "adapter", "alpha", "beta"], ignore_index=True
    )


def _run_row(run, point: TrialPoint | None) -> dict:
    """A run as a row of the table: its params as the trial logged them, else its grid point's."""
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    done, status = is_done(run), run.info.status

    def ratio(name):  # the ratio the run used: what its method chose on val, else its grid value
        used = params.get(CHOSEN + name, params.get(name))
        return float(used) if used is not None else float("nan")

    row = dict(
        key=tags.get(TRIAL_KEY, ""),
        run_id=run.info.run_id,
        dataset=params.get("dataset", tags.get(DATASET)),
        method=params.get("method", tags.get(METHOD)),
        shots=int(params["shots"]) if "shots" in params else point and point.shots,
        seed=int(params["seed"]) if "seed" in params else point and point.seed,
        adapter=params.get(ADAPTER, ""),
        alpha=ratio(ALPHA),
        beta=ratio(BETA),
        **{k: metrics.get(k, float("nan")) for k in RESULT_METRICS},
        status="FINISHED" if done else ("FAILED" if status == "FINISHED" else status),
        error=tags.get(ERROR, "" if done else ("no metrics" if status == "FINISHED" else "")),
        protocol=params.get(PROTOCOL, point.protocol if point else FEW_SHOT),
        selection_split=params.get(SELECTION_SPLIT, selection_split(point.selects if point else {})),
    )
    if not done:
        row.update({VAL_ACC: float("nan"), TEST_ACC: float("nan")})
    return row


def _point_row(point: TrialPoint) -> dict:
    """A grid point without a run: SCHEDULED."""
    return dict(
        key=point.key,
        run_id="",
        dataset=point.dataset,
        method=point.method,
        shots=point.shots,
        seed=point.seed,
        adapter=point.variant,
        alpha=point.alpha,
        beta=point.beta,
        status="SCHEDULED",
        error="",
        protocol=point.protocol,
        selection_split=selection_split(point.selects),
    )


def rank_runs(results: pd.DataFrame) -> pd.DataFrame:
    """The rows best first, by the one rule every choice uses (the parent's summary, the report's
    pick per seed, promote's champion): the best val_acc; on a tie more shots, then the lower seed,
    then the smaller alpha and beta the run used (closer to zero-shot CLIP; a run without a ratio
    counts as 0, as zero-shot), then the run id, so that the same runs always give the same winner.
    """
    ranked = results.assign(
        _val=results[VAL_ACC].fillna(-1.0), _alpha=results[ALPHA].fillna(0.0), _beta=results[BETA].fillna(0.0)
    )
    ranked = ranked.sort_values(
        ["_val", "shots", "seed", "_alpha", "_beta", "run_id"],
        ascending=[False, False, True, True, True, True],
        kind="stable",
    )
    return ranked.drop(columns=["_val", "_alpha", "_beta"])
