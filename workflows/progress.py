"""A live progress bar for a sweep, fed by Ray Tune's driver-side callbacks."""

from __future__ import annotations

from ray.tune import Callback
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .trial import ERROR_RESULT


class TrialProgress(Callback):
    def __init__(self, total: int, console):
        self.total, self.failed = total, 0
        self.bar = Progress(
            TextColumn("trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}"),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.bar.add_task("trials", total=total, failed=0)

    def __getstate__(self):
        # Tune pickles its run config (callbacks included) for restore; a live bar is not state.
        return {"total": self.total, "failed": self.failed, "bar": None}

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def on_trial_complete(self, iteration, trials, trial, **info):
        if ERROR_RESULT in (trial.last_result or {}):
            self.on_trial_error(iteration, trials, trial)
        elif self.bar:
            self.bar.advance(self.task, len(trial.config["trials"]))  # grid points: a pack holds several

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += len(trial.config["trials"])
        if self.bar:
            self.bar.update(self.task, advance=len(trial.config["trials"]), failed=self.failed)
