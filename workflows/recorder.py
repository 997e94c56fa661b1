"""The sweep's recorder: one Ray actor beside the driver that writes every trial's record to MLflow.

Trials hand it their start, result or failure and wait only for the hand-over, never for MLflow: a
writer thread inside the actor drains the records in order. Waiting for the hand-over matters: a
call still queued in a trial's worker, or an argument that worker owns, dies with the worker when
Tune ends its actors, and the record would be lost without a trace. A trial worker never imports
MLflow (it starts seconds sooner), no trial searches the store for its run, a local SQLite store has
one writer, and the writes overlap the next trial's training. The recorder owns key -> run: a trial
retried by Tune, or run again by `resume`, gets the run its key already has.

A run still becomes FINISHED only after its metrics are written, in that order, by this one writer.
What could not be written (the store went away) is reported by `drain`, which the driver calls
before it closes the sweep; those trials stay unfinished and `resume` runs them again.
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

from . import barrier, settings, sqlite_wal
from .errors import error_line
from .names import ATTEMPT, ERROR, TRIAL_KEY
from .point import TrialPoint
from .run_search import children, is_done
from .tracking import unreachable
from .trial_runs import create_trial_run, fail_run, finish_trial, reopen_trial_run


class Recorder:
    def __init__(self, uri: str, exp_id: str, parent_id: str, sweep_id: str):
        barrier.barrier("recorder", sweep_id)  # a test can lose the recorder as it starts
        import mlflow

        settings.for_mlflow()  # in the recorder's own process: it writes the adapters' files
        sqlite_wal.commit_without_sync()
        self.client = mlflow.MlflowClient(uri)
        self.uri, self.sweep = uri, dict(exp_id=exp_id, parent_id=parent_id, sweep_id=sweep_id)
        self.runs: dict[str, str] = {}  # trial key -> run id
        self.attempts: dict[str, int] = {}
        self.errored: set[str] = set()  # runs carrying an error tag from a failed attempt
        self.unwritten: dict[str, str] = {}  # trial key -> why its record could not be written
        self.done: set[str] = set()  # keys whose result is held: handed over, or FINISHED in the store
        self.down_since: float | None = None
        for run in children(self.client, exp_id, parent_id):
            key = run.data.tags.get(TRIAL_KEY)
            if key:
                self.runs[key] = run.info.run_id
                self.attempts[key] = int(run.data.tags.get(ATTEMPT, "0"))
                if ERROR in run.data.tags:
                    self.errored.add(key)
                if is_done(run):
                    self.done.add(key)
        self.records: queue.Queue = queue.Queue()
        threading.Thread(target=self._write_records, daemon=True, name="ca-flow-recorder").start()

    def _write(self, key: str, what: str, write) -> None:
        """One write; a store that failed a moment ago is checked first, so a long outage costs one
        quick probe per write instead of MLflow's whole retry budget each time."""
        if self.down_since is not None and not self._reachable():
            self.unwritten[key] = f"{what} not recorded: the tracking store is unreachable"
            return
        try:
            write()
            self.down_since = None
        except Exception as exc:
            self.down_since = time.time()
            self.unwritten[key] = f"{what} not recorded: {error_line(exc)}"

    def _reachable(self) -> bool:
        return not self.uri.startswith(("http://", "https://")) or unreachable(self.uri, 2) is None

    def _start(self, point: TrialPoint, start_ms: int) -> None:
        """The trial's run, created (or reopened) as the trial starts: RUNNING, attempt + 1."""
        key = point.key
        self.unwritten.pop(key, None)

        def write():
            attempt = self.attempts.get(key, 0) + 1
            if key in self.runs:
                reopen_trial_run(self.client, self.runs[key], attempt, key in self.errored)
                self.errored.discard(key)
            else:
                self.runs[key] = create_trial_run(self.client, self.sweep, point, start_ms)
            self.attempts[key] = attempt

        self._write(key, "start", write)

    def _finish(
        self,
        key: str,
        params: dict,
        metrics: dict,
        losses: list[float],
        files: dict[str, bytes],
        dataset: dict,
        end_ms: int,
    ) -> None:
        if key not in self.runs:
            self.unwritten.setdefault(key, "finish not recorded: the trial's run was never created")
            return
        folder = Path(tempfile.mkdtemp(prefix="ca-flow-adapter-"))

        def write():
            if key in self.errored:  # a failed attempt's tag, written after the retry started
                self.client.delete_tag(self.runs[key], ERROR)
                self.errored.discard(key)
            finish_trial(self.client, self.runs[key], params, metrics, losses, str(folder), dataset, end_ms)

        try:
            for name, data in files.items():
                (folder / name).write_bytes(data)
            self._write(key, "result", write)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _fail(self, key: str, error: str) -> None:
        if key in self.runs:
            self.errored.add(key)
            self._write(key, "failure", lambda: fail_run(self.client, self.runs[key], error))

    # -- the hand-over: trials wait for these, and they only queue ---------------------------------

    def start(self, point: TrialPoint, start_ms: int) -> None:
        self.records.put((point.key, self._start, (point, start_ms)))

    def finish(self, key: str, *record) -> None:
        self.done.add(key)
        self.records.put((key, self._finish, (key, *record)))

    def fail(self, key: str, error: str) -> None:
        self.records.put((key, self._fail, (key, error)))

    def finished(self, keys: list[str]) -> list[str]:
        """Which of `keys` this recorder holds a result for (handed over, or FINISHED in the store): a
        retried pack skips them. Handed over is enough: one that is then not written is reported by
        `drain`, stays unfinished and `resume` runs it."""
        return [k for k in keys if k in self.done]

    def drain(self) -> dict[str, str]:
        """Called last, once every trial has handed over: waits until all of it is written."""
        self.records.join()
        return dict(self.unwritten)

    def _write_records(self) -> None:
        while True:
            key, write, args = self.records.get()
            try:
                write(*args)
            except Exception as exc:  # e.g. an adapter file that cannot be staged: reported, never fatal
                self.unwritten[key] = f"record not written: {error_line(exc)}"
            finally:
                self.records.task_done()


def start_recorder(uri: str, exp_id: str, parent_id: str, sweep_id: str):
    """The recorder actor on the driver's node: it lives and dies with the sweep."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = (
        ray.remote(Recorder)
        .options(
            num_cpus=0,
            max_restarts=0,
            name=f"ca-flow-recorder-{sweep_id}",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        )
        .remote(uri, exp_id, parent_id, sweep_id)
    )
    return actor


def drain(recorder) -> dict[str, str]:
    """{trial key: why its record is missing}; a recorder that died leaves its trials to `close`."""
    import ray

    try:
        return ray.get(recorder.drain.remote())
    except Exception:  # its unfinished runs are then closed FAILED by the driver, and resume reruns them
        return {}
