"""A running sweep's lifecycle: the signals that stop it, and the heartbeat that says it is alive.

A first SIGINT/SIGTERM stops launching trials and closes the sweep; a second one exits at once. The
parent run's heartbeat tag tells `ca-flow sweeps` and `resume` that a driver is still at work.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from . import parent_run, runs_table


class Interrupted(BaseException):
    """A BaseException, as KeyboardInterrupt is: code that handles errors (Ray Data's iterator logs
    any Exception as a Ray bug, connecting to Ray turns one into a connection error) lets it pass."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """First SIGINT/SIGTERM: stop launching trials and close the sweep; a second one exits at once.

    The handler raises only into ca-flow's own code. While Ray Tune or the encoding pipeline runs it
    only records the signal, and they poll it (Tune's stopper; `check` between batches and while
    waiting on Ray): an exception raised inside Ray's or Ray Data's own frames breaks them (a
    SystemError from Ray's C++ core, Ray Data's "internal error" traceback).
    """

    def __init__(self):
        self.received, self.polled, self._old = 0, False, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def reinstall(self) -> None:
        """ray.init puts its own SIGTERM handler (exit at once) in place: put ours back."""
        for sig in self._old:
            signal.signal(sig, self._handle)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @contextlib.contextmanager
    def polling(self):
        self.polled = True
        try:
            yield
        finally:
            self.polled = False

    def check(self) -> None:
        if self.received:
            raise Interrupted(self.received)

    def _handle(self, signum, frame):
        if self.received:
            os._exit(128 + signum)
        self.received = signum
        if not self.polled:
            raise Interrupted(signum)
        print(
            f"{signal.Signals(signum).name}: stopping once the step under way ends (again: exit at once)",
            file=sys.stderr,
            flush=True,
        )


class Heartbeat(threading.Thread):
    """Refreshes the parent's heartbeat tag; a store that does not answer is retried next beat."""

    def __init__(self, uri: str, parent_id: str):
        super().__init__(daemon=True, name="ca-flow-heartbeat")
        self.uri, self.parent_id, self.stopped = uri, parent_id, threading.Event()

    def run(self):
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        while not self.stopped.wait(runs_table.heartbeat_seconds()):
            try:
                parent_run.beat(client, self.parent_id)
            except Exception:
                pass
