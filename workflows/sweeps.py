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
import re
import socket
import time

import pandas as pd

from clip_adapter.protocol import selection_split

from . import tracking
from .tracking import DRIVER, HEARTBEAT, PARENT, SPEC, SWEEP_ID, TOTALS, TrackingError

SWEEP_ID_FORM = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
RESULT_COLUMNS = ["sweep_id", "key", "run_id", "dataset", "method", "shots", "seed", "adapter", "alpha", "beta",
                  "val_acc", "test_acc", "zs_test_acc", "train_loss_final", "trial_seconds", "status", "error",
                  "protocol", "selection_split"]


def heartbeat_seconds() -> float:
    return float(os.environ.get("CA_FLOW_HEARTBEAT_S", "30"))


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
    return {"FINISHED": "finished", "FAILED": "failed", "KILLED": "interrupted", "SCHEDULED": "submitted"}[status]


def parents(client, experiment: str | None = None, sweep_id: str | None = None) -> list:
    """Sweep parent runs, newest first: of one experiment or all, of one sweep id or every one."""
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise TrackingError(f"no experiment {experiment!r} in this tracking store; run `ca-flow sweep` first "
                                f"or pass another --experiment")
        exp_ids = [exp.experiment_id]
    else:
        exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    where = f"tags.`{SWEEP_ID}` = {tracking.quoted(sweep_id)}" if sweep_id else f"tags.`{SPEC}` != ''"
    runs = tracking.all_runs(client, exp_ids, where, order_by=["attributes.start_time DESC"])
    return [r for r in runs if PARENT not in r.data.tags and SPEC in r.data.tags]


def find(client, sweep_id: str | None, experiment: str | None = None, unfinished: bool = False):
    """One sweep's parent run: `sweep_id` in any experiment, else the latest (unfinished) one."""
    if sweep_id is not None and not SWEEP_ID_FORM.match(sweep_id):
        raise TrackingError(f"{sweep_id!r} is not a sweep id (they look like 20261127-101500-1a2b3c); "
                            f"see `ca-flow sweeps`")
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
        row = per.setdefault(run.data.tags.get(tracking.DATASET, "?"), dict(finished=0, failed=0, running=0, total=0))
        if tracking.is_done(run):
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
    runs = tracking.children(client, info.experiment_id, info.run_id)
    prog = progress(parent, runs)
    end = info.end_time or (None if state(parent) == "running" else max(
        [r.info.end_time or 0 for r in runs] + [int(float(parent.data.tags.get(HEARTBEAT, 0)) * 1000),
                                                info.start_time]))
    started = info.start_time / 1000
    return dict(sweep_id=parent.data.tags[SWEEP_ID], experiment=client.get_experiment(info.experiment_id).name,
                status=state(parent), finished=prog["finished"], failed=prog["failed"], running=prog["running"],
                total=prog["total"], started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                seconds=round(((end / 1000) if end else time.time()) - started, 1),
                parent_run_id=info.run_id, driver=parent.data.tags.get(DRIVER, ""), datasets=prog["datasets"])


def frame(sweep_id: str, runs: list, trials: list[dict] | None = None) -> pd.DataFrame:
    """One row per trial run; with `trials` (the grid), grid points without a run too, SCHEDULED.

    A run shows FINISHED only with its metrics; anything else shows its own status and error.
    """
    rows, seen = [], set()
    points = {t["key"]: t for t in trials or []}  # a run that failed before logging params: its grid point
    for r in runs:
        p, m, tags = r.data.params, r.data.metrics, r.data.tags
        seen.add(tags.get(tracking.TRIAL_KEY))
        done = tracking.is_done(r)
        point = points.get(tags.get(tracking.TRIAL_KEY), {})
        rows.append(dict(
            key=tags.get(tracking.TRIAL_KEY, ""), run_id=r.info.run_id,
            dataset=p.get("dataset", tags.get(tracking.DATASET)), method=p.get("method", tags.get(tracking.METHOD)),
            shots=int(p["shots"]) if "shots" in p else point.get("shots"),
            seed=int(p["seed"]) if "seed" in p else point.get("seed"),
            adapter=p.get("adapter", ""),
            alpha=float(p["alpha"]) if "alpha" in p and "chosen_alpha" not in p else float("nan"),
            beta=float(p["beta"]) if "beta" in p and "chosen_beta" not in p else float("nan"),
            **{k: m.get(k, float("nan")) for k in ("val_acc", "test_acc", "zs_test_acc", "train_loss_final",
                                                   "trial_seconds")},
            status="FINISHED" if done else ("FAILED" if r.info.status == "FINISHED" else r.info.status),
            error=tags.get(tracking.ERROR, "" if done else ("no metrics" if r.info.status == "FINISHED" else "")),
            protocol=p.get("protocol", point.get("protocol", "few-shot")),
            selection_split=p.get("selection_split", selection_split(point.get("select", {})))))
        if not done:
            rows[-1].update(val_acc=float("nan"), test_acc=float("nan"))
    for t in trials or []:
        if t["key"] not in seen:
            hp = t["hparams"]
            rows.append(dict(key=t["key"], run_id="", dataset=t["dataset"], method=t["method"], shots=t["shots"],
                             seed=t["seed"], adapter=hp.get("variant", ""), alpha=hp.get("alpha", float("nan")),
                             beta=hp.get("beta", float("nan")), status="SCHEDULED", error="",
                             protocol=t.get("protocol", "few-shot"),
                             selection_split=selection_split(t.get("select", {}))))
    out = pd.DataFrame(rows, columns=RESULT_COLUMNS[1:])
    out.insert(0, "sweep_id", sweep_id)
    if trials:  # the grid's points only (a run whose key left the grid is not this sweep's any more)
        out = out[out["key"].isin({t["key"] for t in trials})]
    return out.sort_values(["dataset", "method", "shots", "seed", "adapter", "alpha", "beta"], ignore_index=True)
