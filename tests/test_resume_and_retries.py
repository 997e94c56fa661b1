"""Resume and retries, on real processes, with faults placed by the trials' barrier (never by timing):
`resume` leaves finished grid points untouched, across datasets; `--max-retries N` gives a lost
worker exactly N more attempts; a recorder lost as it starts fails every point, and resume finishes them.

Each trial attempt waits at the test barrier (workflows/barrier.py, point `trial`) right after its run
is started; the test releases it, or kills its worker there (benchmarks/faults.py Bench).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import make_colour_tree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import faults  # noqa: E402
import procs  # noqa: E402


def sweep_args(b: faults.Bench, datasets: str, alphas: str, *extra: str) -> list[str]:
    return [
        "sweep",
        "--datasets",
        datasets,
        *procs.TINY_SWEEP,
        "--methods",
        "clip-adapter",
        "--shots",
        "1",
        "--seeds",
        "1",
        "--alphas",
        alphas,
        "--epochs",
        "3",
        "--augment-views",
        "1",
        "--experiment",
        b.experiment,
        "--tracking-uri",
        b.uri,
        "--cache-dir",
        str(b.cache),
        "--results-dir",
        str(b.work / "results"),
        "--storage-path",
        str(b.work / "tune"),
        *extra,
    ]


def finished_record(client, run) -> dict:
    """What a retrain would change: the run, its attempt, status, end time, metrics and loss curve."""
    history = client.get_metric_history(run.info.run_id, "train_loss")
    return dict(
        run_id=run.info.run_id,
        status=run.info.status,
        end_time=run.info.end_time,
        attempt=run.data.tags.get(faults.ATTEMPT),
        metrics=dict(run.data.metrics),
        losses=[(m.step, m.value, m.timestamp) for m in sorted(history, key=lambda m: m.step)],
    )


@pytest.mark.slow
def test_resume_leaves_every_finished_run_of_a_multi_dataset_sweep_untouched(tmp_path):
    data = tmp_path / "data"
    make_colour_tree(data / "colours", per_class=4)
    make_colour_tree(data / "tints", per_class=4, seed=1)
    with faults.Bench(tmp_path, "multi-resume") as b:
        env = b.barrier_env()
        sweep = b.start("sweep", sweep_args(b, "colours,tints", "0.2,0.6", "--data-root", str(data)), env)

        # colours' two points run and finish, then tints' first; tints' second is held at its barrier
        released: dict[str, str] = {}  # key -> dataset

        def step():
            for key, trial in b.waiting().items():
                if trial["dataset"] == "colours" or "tints" not in released.values():
                    b.release(key)
                    released[key] = trial["dataset"]
            held = [k for k, v in b.waiting().items() if v["dataset"] == "tints"]
            return b.done() == 3 and held and held[0]

        unfinished = procs.wait_for(
            "colours done, one tints trial done and one at the barrier", step, 300, [sweep]
        )
        sweep.signal(signal.SIGINT)
        assert sweep.wait(120) == 130, sweep.output()[-3000:]

        client = b.client()
        _, children = b.runs()
        assert len(children) == 4, [c.info.run_name for c in children]
        before = {c.data.tags[faults.KEY]: finished_record(client, c) for c in children if faults.is_done(c)}
        assert sorted(c.data.tags["ca_flow.dataset"] for c in children if faults.is_done(c)) == [
            "colours",
            "colours",
            "tints",
        ]
        assert unfinished not in before and all(r["attempt"] == "1" for r in before.values())
        assert all(len(r["losses"]) == 3 for r in before.values())  # --epochs 3: one loss per epoch

        rc, out = faults._resume(b, b.sweep_id())
        _, children = b.runs()
        after = {c.data.tags[faults.KEY]: c for c in children}
        assert len(children) == 4 and set(after) == set(before) | {unfinished}
        for key, record in before.items():  # the same run, attempt, end, metrics and loss curve
            assert finished_record(client, after[key]) == record, key
        assert rc == 0, out[-3000:]
        assert f"resuming sweep {b.sweep_id()}: 3 of 4 trials already done, 1 to run" in out, out[-3000:]
        assert faults.DONE.match(faults.own_last_line(out)[0]).groups()[1:] == ("4", "0"), out[-3000:]
        assert faults.is_done(after[unfinished]) and after[unfinished].data.tags[faults.ATTEMPT] == "2"


def kill_attempts(b: faults.Bench, sweep: procs.Proc, key: str, n: int) -> list[int]:
    """kill -9 the worker of each of the first `n` attempts of trial `key`, at its barrier."""
    killed: list[int] = []
    for attempt in range(1, n + 1):

        def next_attempt():
            found = b.waiting().get(key)
            return found and found["pid"] not in killed and found["pid"]

        pid = procs.wait_for(f"attempt {attempt} of trial {key} at the barrier", next_attempt, 240, [sweep])
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    return killed


@pytest.mark.slow
@pytest.mark.parametrize("retries", [0, 1])
def test_max_retries_n_gives_a_lost_worker_exactly_n_retries(tmp_path, retries):
    make_colour_tree(tmp_path / "data" / "colours", per_class=4)
    with faults.Bench(tmp_path, f"retries-{retries}") as b:
        env = b.barrier_env()
        sweep = b.start(
            "sweep",
            sweep_args(
                b, "colours", "0.2", "--max-retries", str(retries), "--data-root", str(tmp_path / "data")
            ),
            env,
        )
        killed = kill_attempts(
            b,
            sweep,
            key := procs.wait_for(
                "the trial at the barrier", lambda: next(iter(b.waiting()), None), 240, [sweep]
            ),
            retries + 1,
        )
        # Tune must give up now: an attempt after the last allowed one would reach the barrier again.
        deadline = time.monotonic() + 240
        while sweep.alive() and time.monotonic() < deadline:
            again = b.waiting().get(key)
            assert not (again and again["pid"] not in killed), (
                f"attempt {retries + 2}: {sweep.output()[-2000:]}"
            )
            time.sleep(0.2)
        rc = sweep.wait(10)
        out = sweep.output()
        assert rc == 1, out[-3000:]
        found = faults.FAILED_LINE.search(out)
        assert found and found.groups() == ("1", "1", b.sweep_id()), out[-3000:]
        (run,) = b.runs()[1]
        assert run.data.tags[faults.KEY] == key and run.info.status == "FAILED", run
        assert run.data.tags[faults.ATTEMPT] == str(retries + 1), run.data.tags


@pytest.mark.slow
def test_a_recorder_killed_as_it_starts_fails_every_point_and_resume_finishes_them(tmp_path):
    """Tune starts without waiting for the recorder (sweep._start_recorder). kill -9 of the recorder
    while it starts, held at its barrier (point `recorder`): no trial can hand over a record, so every
    grid point fails and none reads as done, the sweep exits 1 with the resume line, and `resume`, with
    a recorder of its own, finishes them all."""
    make_colour_tree(tmp_path / "data" / "colours", per_class=4)
    with faults.Bench(tmp_path, "recorder-killed") as b:
        held = tmp_path / "barrier" / "recorder"
        held.mkdir(parents=True)
        env = dict(b.env, CA_FLOW_TEST_BARRIER=str(held.parent))
        data = ("--data-root", str(tmp_path / "data"))
        sweep = b.start("sweep", sweep_args(b, "colours", "0.2,0.6", "--max-retries", "0", *data), env)
        started = procs.wait_for(
            "the recorder at its barrier", lambda: next(held.glob("*.started"), None), 240, [sweep]
        )
        os.kill(json.loads(started.read_text())["pid"], signal.SIGKILL)
        rc = sweep.wait(240)
        out = sweep.output()
        assert rc == 1, out[-3000:]
        found = faults.FAILED_LINE.search(out)
        assert found and found.groups() == ("2", "2", b.sweep_id()), out[-3000:]
        why = out[found.end() :].splitlines()[1:3]  # one line per failed point, after the count
        assert all("the sweep's recorder died, so this trial cannot be recorded" in line for line in why), why
        assert not [c for c in b.runs()[1] if faults.is_done(c)]

        rc, out = faults._resume(b, b.sweep_id())
        assert rc == 0, out[-3000:]
        assert faults.DONE.match(faults.own_last_line(out)[0]).groups()[1:] == ("2", "0"), out[-3000:]
        procs.assert_sweep_complete(b.store, b.experiment, 2)
