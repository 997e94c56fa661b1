"""The sweep's recorder: one Ray actor beside the driver that writes every trial's record to MLflow.

Trials tell it when they start, finish or fail, and do not wait for the writes: a trial worker never
imports MLflow (it starts seconds sooner), no trial searches the store for its run, a local SQLite
store has one writer, and the writes overlap the next trial's training. The recorder owns
key -> run: a trial retried by Tune, or run again by `resume`, gets the run its key already has.

A run still becomes FINISHED only after its metrics are written, in that order, by this one writer.
What could not be written (the store went away) is reported by `drain`, which the driver calls
before it closes the sweep; those trials stay unfinished and `resume` runs them again.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from . import tracking


class Recorder:
    def __init__(self, uri: str, exp_id: str, parent_id: str, sweep_id: str):
        import mlflow

        if uri.startswith("sqlite:"):
            _write_ahead_log()
        self.client = mlflow.MlflowClient(uri)
        self.uri, self.ctx = uri, dict(exp_id=exp_id, parent_id=parent_id, sweep_id=sweep_id)
        self.runs: dict[str, str] = {}       # trial key -> run id
        self.attempts: dict[str, int] = {}
        self.errored: set[str] = set()       # runs carrying an error tag from a failed attempt
        self.unwritten: dict[str, str] = {}  # trial key -> why its record could not be written
        self.done: set[str] = set()          # keys whose record is written: FINISHED with metrics
        self.down_since: float | None = None
        for run in tracking.children(self.client, exp_id, parent_id):
            key = run.data.tags.get(tracking.TRIAL_KEY)
            if key:
                self.runs[key] = run.info.run_id
                self.attempts[key] = int(run.data.tags.get(tracking.ATTEMPT, "0"))
                if tracking.ERROR in run.data.tags:
                    self.errored.add(key)
                if tracking.is_done(run):
                    self.done.add(key)

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
            self.unwritten[key] = f"{what} not recorded: {tracking.error_line(exc)}"

    def _reachable(self) -> bool:
        if not self.uri.startswith(("http://", "https://")):
            return True
        try:
            urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=2).read()
            return True
        except OSError:
            return False

    def start(self, t: dict, start_ms: int) -> None:
        """The trial's run, created (or reopened) as the trial starts: RUNNING, attempt + 1."""
        key = t["key"]
        self.unwritten.pop(key, None)

        def write():
            attempt = self.attempts.get(key, 0) + 1
            if key in self.runs:
                tracking.reopen_trial_run(self.client, self.runs[key], attempt, key in self.errored)
                self.errored.discard(key)
            else:
                self.runs[key] = tracking.create_trial_run(self.client, self.ctx, t, start_ms)
            self.attempts[key] = attempt
        self._write(key, "start", write)

    def finish(self, key: str, params: dict, metrics: dict, losses: list[float], files: dict[str, bytes],
               dataset: dict, end_ms: int) -> None:
        if key not in self.runs:
            self.unwritten.setdefault(key, "finish not recorded: the trial's run was never created")
            return
        folder = Path(tempfile.mkdtemp(prefix="ca-flow-adapter-"))

        def write():
            if key in self.errored:  # a failed attempt's tag, written after the retry started
                self.client.delete_tag(self.runs[key], tracking.ERROR)
                self.errored.discard(key)
            tracking.finish_trial(self.client, self.runs[key], params, metrics, losses, str(folder), dataset, end_ms)
            self.done.add(key)
        try:
            for name, data in files.items():
                (folder / name).write_bytes(data)
            self._write(key, "result", write)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def fail(self, key: str, error: str) -> None:
        if key in self.runs:
            self.errored.add(key)
            self._write(key, "failure", lambda: tracking.fail_trial(self.client, self.runs[key], error))

    def finished(self, keys: list[str]) -> list[str]:
        """Which of `keys` have their record written: a retried pack skips them."""
        return [k for k in keys if k in self.done]

    def drain(self) -> dict[str, str]:
        """Called last: every write sent before it is done (an actor runs calls in order)."""
        return dict(self.unwritten)


def _write_ahead_log() -> None:
    """This process's SQLite connections commit to a write-ahead log, synced at checkpoints rather than
    at each of a trial's nine commits (an fsync each: most of a trial's write time on a local disk). A
    killed process loses nothing committed; a power cut may lose the last commits, which `resume` reruns.
    Readers (the driver, `mlflow ui`) no longer wait on the writer."""
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _pragmas(connection, _record):
        if isinstance(connection, sqlite3.Connection):
            cursor = connection.cursor()
            try:
                cursor.execute("PRAGMA journal_mode=WAL")  # kept in the file: once per store
            except sqlite3.OperationalError:  # another connection holds it now: the next one switches
                pass
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()


def start_recorder(uri: str, exp_id: str, parent_id: str, sweep_id: str):
    """The recorder actor on the driver's node: it lives and dies with the sweep."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(Recorder).options(
        num_cpus=0, max_restarts=0, name=f"ca-flow-recorder-{sweep_id}",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(uri, exp_id, parent_id, sweep_id)
    return actor


def drain(recorder) -> dict[str, str]:
    """{trial key: why its record is missing}; a recorder that died leaves its trials to `close`."""
    import ray

    try:
        return ray.get(recorder.drain.remote())
    except Exception:  # its unfinished runs are then closed FAILED by the driver, and resume reruns them
        return {}
