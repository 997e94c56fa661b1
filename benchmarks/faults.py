"""Faults a durable sweep must survive, on real processes: what the MLflow store holds afterwards.

    python benchmarks/faults.py [--only sigint,driver_kill,...] [--work DIR]

Each scenario runs `ca-flow` as a user does (a subprocess in its own session, with its own HOME, Ray
temp dir, stores and results under a work dir) on the textile images with the tiny random backbone,
injects its fault, recovers the way the CLI says to (`ca-flow resume <id>`) where the fault stops the
sweep, and reads the store afterwards:

    sigint         SIGINT mid-sweep (exit 130, runs KILLED), then resume
    driver_kill    kill -9 of the driver (runs left RUNNING, sweep shown interrupted), then resume
    worker_kill    kill -9 of a running Tune trial actor: Tune retries it into the same run (rc 0)
    node_loss      a head and a worker node; the worker node's processes killed mid-sweep (rc 0)
    mlflow_outage  the tracking server killed for longer than MLflow's HTTP retry budget (exit 1),
                   restarted on the same port and database, then resume
    mlflow_blip    the tracking server hangs past the budget and answers again before the sweep
                   ends: every grid point left undone is counted as failed (exit 1), then resume
                   (not run by tests/test_faults.py, which would take too long with it; a quick test
                   there checks the same count on a real store with the sweep's own close)
    submit_stop    `sweep --submit` to a head's job API, `status`, `ray job stop` (an interruption),
                   then resume

and prints: scenario | trials | finished | lost | duplicate runs | stuck runs | seconds to recover
(| exit codes, of the faulted command, then of what recovered it). `lost` is grid points without a
FINISHED run with metrics at the end, `duplicate runs` runs beyond one per trial key, `stuck runs` runs
left SCHEDULED or RUNNING, `seconds to recover` the time from the fault to a complete store (re-running
what the fault cost included, and the CLI's own start-up: Ray, imports).

Where a fault lands is decided by the trials' test barrier (workflows/barrier.py, point `trial`):
every trial attempt waits at its start, inside its RUNNING run, until the scenario releases it; a
scenario lets a few through, holds the next ones, and injects its fault then (Bench.hold_after).

Every scenario function takes a work dir (and, optionally, a feature store to share: every scenario
samples the same images) and returns a dict: those figures plus what tests/test_faults.py asserts
(exit codes, last lines, the store's state right after the fault, the time of each step in `marks`).
The two-node and job scenarios run Ray with token authentication, as a user's cluster has it.
Processes a scenario starts are stopped when it returns or fails, by their own session, never by name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

import procs  # noqa: E402

# Every scenario samples the same few-shot images (shots x seeds): one feature store serves them all.
SHOTS, SEEDS, VIEWS = [1, 2], [1, 2], 2
EPOCHS = 5  # where a fault lands is the trials' barrier's business (Bench.hold_after), not their length
INTERRUPTED = re.compile(r"^interrupted: (\d+) of (\d+) trials done; resume with: ca-flow resume (\S+)$")
DONE = re.compile(r"^sweep (\S+): (\d+) trials, (\d+) failed, ")
KEY, ATTEMPT = "ca_flow.trial_key", "ca_flow.attempt"


# What Ray's driver prints by itself, from a background thread, e.g. a dead node's raylet log tail:
# a line naming the component, then indented lines. It can land after ca-flow's own last line.
RAY_MESSAGE = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|gcs_server|autoscaler|monitor)[^)]*\)")


def own_last_line(out: str) -> tuple[str, bool]:
    """The CLI's own last line, and whether Ray printed a message of its own after it."""
    lines, noise = out.splitlines(), False
    while True:
        while lines and not lines[-1].strip():
            lines.pop()
        head = len(lines) - 1
        while head > 0 and (not lines[head].strip() or lines[head][:1].isspace()):
            head -= 1
        if head < 0 or not RAY_MESSAGE.search(lines[head]):
            return (lines[-1].strip() if lines else ""), noise
        del lines[head:]
        noise = True


def said(out: str) -> dict:
    last, ray_after = own_last_line(out)
    return dict(last_line=last, ray_after_last_line=ray_after)


def alphas(n: int) -> list[float]:
    return [round(0.1 * i, 2) for i in range(1, n + 1)]


def trials(n_alphas: int) -> int:
    return len(SHOTS) * len(SEEDS) * n_alphas


class Bench:
    """One scenario's room: work dir, HOME, Ray temp dir, store, logs, and the processes it started."""

    def __init__(self, work: Path, name: str, cache: Path | None = None):
        self.work, self.name = Path(work), name
        self.home, self.logs = self.work / "home", self.work / "logs"
        for d in (self.work, self.home, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.ray_tmp = procs.ray_temp_dir()  # short: Ray's unix sockets live under it
        # RAY_TMPDIR: a Ray that `ca-flow` starts itself keeps its files here, not in a shared /tmp/ray.
        # PATH: a Ray job's entrypoint (`python -m workflows.cli`) must find this interpreter.
        self.env = procs.clean_env(
            self.home, RAY_TMPDIR=self.ray_tmp, PATH=f"{procs.BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        )
        self.cache = Path(cache) if cache else self.work / "cache"
        self.db = self.work / "mlflow.db"
        self.uri = f"sqlite:///{self.db}"  # the store as the CLI sees it (a server URI where one runs)
        self.store = self.uri  # the same store read directly (the server's own database)
        self.experiment = f"faults-{name}"
        self.started: list[procs.Proc] = []
        self.t0, self.marks = time.monotonic(), {}  # seconds since the scenario began, per step
        self._client = None
        # The schema once, now: this process polls the store while the CLI writes it, and two processes
        # creating a fresh SQLite schema at once race (alembic "expected to match one row").
        self.client()

    def __enter__(self):
        return self

    # -- the trials' barrier (workflows/barrier.py, point `trial`): where a fault lands ----------
    def barrier_env(self, env: dict | None = None) -> dict:
        """`env` with the barrier on for trials: every attempt waits at its start until released."""
        self.barrier = self.work / "barrier" / "trial"
        self.barrier.mkdir(parents=True, exist_ok=True)
        return dict(env or self.env, CA_FLOW_TEST_BARRIER=str(self.barrier.parent))

    def waiting(self) -> dict[str, dict]:
        """key -> {pid, trial, dataset} of the trial attempts at the barrier and not released."""
        out = {}
        for path in self.barrier.glob("*.started"):
            key = path.name[: -len(".started")]
            if not (self.barrier / f"{key}.release").exists():
                with contextlib.suppress(OSError, ValueError):
                    out[key] = json.loads(path.read_text())
        return out

    def release(self, *keys: str) -> None:
        for key in keys:
            (self.barrier / f"{key}.release").touch()

    def release_all(self) -> None:
        (self.barrier / "release").touch()

    def hold_after(self, n: int, watch: list[procs.Proc], timeout: float = 240) -> tuple[dict, dict]:
        """Let the first `n` trials through the barrier and hold every later one: (held trials, the
        store) once those `n` are finished and at least one more waits inside its RUNNING run."""
        released: set[str] = set()

        def step():
            for key in self.waiting():
                if len(released) < n:
                    self.release(key)
                    released.add(key)
            held, snap = self.waiting(), self.snapshot()
            return snap["done"] >= n and held and (held, snap)

        return procs.wait_for(
            f"{n} trials finished and the next held at the barrier", step, timeout, watch, interval=0.2
        )

    def __exit__(self, *exc):
        for p in reversed(self.started):
            p.stop(graceful_s=2)
            procs.kill_session(p.pid)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def cluster_env(self) -> dict:
        """The environment of a `ray start` cluster's nodes and clients, with token auth as a user's
        cluster has it (cluster/README.md): a token in ~/.ray/auth_token (this HOME: the nodes and the
        CLI share it) and RAY_AUTH_MODE=token. Ray 2.60's `ray start --head` would start open without
        a token, and a joining node, `ray.init(address=...)` and the job client look for one only in
        token mode (InvalidAuthToken / 401 Missing authentication token otherwise)."""
        subprocess.run(
            [procs.RAY, "get-auth-token", "--generate"],
            env=self.env,
            cwd=self.work,
            check=True,
            capture_output=True,
            timeout=60,
        )
        return dict(self.env, RAY_AUTH_MODE="token")

    def mark(self, what: str) -> float:
        self.marks[what] = round(time.monotonic() - self.t0, 1)
        return time.monotonic()

    # -- the CLI ---------------------------------------------------------------------------------
    def sweep_args(self, n_alphas: int, epochs: int, *extra: str) -> list[str]:
        """`ca-flow sweep` of 4 x n_alphas trials on textile (tiny random backbone), here."""
        return [
            "sweep",
            "--datasets",
            "textile",
            *procs.TINY_SWEEP,
            "--methods",
            "clip-adapter",
            "--shots",
            ",".join(map(str, SHOTS)),
            "--seeds",
            ",".join(map(str, SEEDS)),
            "--alphas",
            ",".join(map(str, alphas(n_alphas))),
            "--epochs",
            str(epochs),
            "--augment-views",
            str(VIEWS),
            "--experiment",
            self.experiment,
            "--tracking-uri",
            self.uri,
            "--cache-dir",
            str(self.cache),
            "--results-dir",
            str(self.work / "results"),
            "--storage-path",
            str(self.work / "tune"),
            *extra,
        ]

    def start(self, name: str, args: list[str], env: dict | None = None) -> procs.Proc:
        p = procs.ca_flow(args, self.logs / f"{name}.log", env or self.env, self.work)
        self.started.append(p)
        self.mark(f"{name} started")
        return p

    def run(
        self, name: str, args: list[str], timeout: float = 300, env: dict | None = None
    ) -> tuple[int, str]:
        p = self.start(name, args, env)
        rc = p.wait(timeout)
        self.mark(f"{name} ended")
        return rc, p.output()

    def status(self, sweep_id: str) -> dict:
        rc, out = self.run(
            f"status-{len(self.started)}",
            ["status", sweep_id, "--tracking-uri", self.uri, "--json"],
            timeout=120,
        )
        assert rc == 0, out
        return json.loads(out[out.index("{") :])

    # -- the store ---------------------------------------------------------------------------------
    def client(self):
        import mlflow

        if self._client is None:
            self._client = mlflow.MlflowClient(self.store)
        return self._client

    def runs(self) -> tuple[list, list]:
        """(parents, children) of this scenario's experiment, read from the database itself."""
        if self.client().get_experiment_by_name(self.experiment) is None:
            return [], []
        return procs.runs_of(self.store, self.experiment)

    def done(self) -> int:
        return sum(is_done(r) for r in self.runs()[1])

    def wait_done(self, at_least: int, watch: list[procs.Proc], timeout: float = 240) -> None:
        procs.wait_for(
            f"{at_least} finished trial runs in {self.experiment}",
            lambda: self.done() >= at_least,
            timeout,
            watch,
            interval=0.3,
        )

    def sweep_id(self) -> str:
        parents, _ = self.runs()
        assert len(parents) == 1, [p.info.run_name for p in parents]
        return parents[0].data.tags["ca_flow.sweep_id"]

    def snapshot(self) -> dict:
        """The store as it is now: parent(s), child runs by status, what would break a table."""
        parents, children = self.runs()
        keys = [c.data.tags.get(KEY) for c in children]
        return dict(
            parents=[p.info.status for p in parents],
            statuses=dict(Counter(c.info.status for c in children)),
            done=sum(is_done(c) for c in children),
            finished_without_metrics=sum(c.info.status == "FINISHED" and not is_done(c) for c in children),
            stuck=sum(c.info.status in ("SCHEDULED", "RUNNING") for c in children),
            duplicates=len(keys) - len(set(keys)),
            runs={
                c.data.tags.get(KEY): (c.info.run_id, c.info.status, c.data.tags.get(ATTEMPT))
                for c in children
            },
        )

    def measure(self, total: int) -> dict:
        """The table's figures, from the store after recovery."""
        parents, children = self.runs()
        done_keys = {c.data.tags.get(KEY) for c in children if is_done(c)}
        keys = [c.data.tags.get(KEY) for c in children]
        return dict(
            trials=total,
            finished=len(done_keys),
            lost=total - len(done_keys),
            duplicate_runs=len(keys) - len(set(keys)),
            stuck_runs=sum(c.info.status in ("SCHEDULED", "RUNNING") for c in children),
            parents=len(parents),
            parent_status=[p.info.status for p in parents],
            attempts={c.data.tags.get(KEY): int(c.data.tags.get(ATTEMPT, "0")) for c in children},
            store=self.store,
            experiment=self.experiment,
            work=str(self.work),
            marks=self.marks,
        )

    def logs_text(self) -> str:
        return "\n".join(p.output() for p in self.started)


def is_done(run) -> bool:
    return run.info.status == "FINISHED" and {"val_acc", "test_acc"} <= set(run.data.metrics)


def anonymous_answer(api: str) -> int:
    """The HTTP status the job API gives a caller without the token (401 with token auth on)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api}/api/jobs/", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def running(snap: dict, status: str = "RUNNING") -> list[str]:
    return sorted(k for k, (_, st, _) in snap["runs"].items() if st == status)


def no_traceback(b: Bench, *more: str) -> bool:
    return "Traceback" not in b.logs_text() + "".join(more)


def _resume(b: Bench, sweep_id: str, *extra: str, env: dict | None = None) -> tuple[int, str]:
    return b.run(f"resume-{len(b.started)}", ["resume", sweep_id, "--tracking-uri", b.uri, *extra], env=env)


def _reused(before: dict, after_runs: dict, keys) -> dict:
    """For each key: was its run (id) before the fault the run it has now?"""
    return {k: before["runs"][k][0] == after_runs.get(k, ("",))[0] for k in keys}


# -- the scenarios -------------------------------------------------------------------------------------


def sigint(work: Path, cache: Path | None = None) -> dict:
    """SIGINT mid-sweep, trials in flight: exit 130 with one line, unfinished runs KILLED, the Parquet
    from MLflow; then resume reuses the KILLED runs and runs only what is not done."""
    n = 2
    with Bench(work, "sigint", cache) as b:
        sweep = b.start("sweep", b.sweep_args(n, EPOCHS), b.barrier_env())
        held, before = b.hold_after(3, [sweep])
        fault = b.mark("fault")
        sweep.signal(signal.SIGINT)
        rc = sweep.wait(120)
        b.mark("sweep ended")
        stopped_s = time.monotonic() - fault
        out, sid = sweep.output(), b.sweep_id()
        after = b.snapshot()
        import pandas as pd

        table = pd.read_parquet(b.work / "results" / f"{sid}.parquet")
        parquet = dict(
            rows=len(table),
            finished=int((table["status"] == "FINISHED").sum()),
            finished_without_metrics=int(((table["status"] == "FINISHED") & table["val_acc"].isna()).sum()),
        )
        resume_rc, resume_out = _resume(b, sid)
        recover = time.monotonic() - fault
        end = b.snapshot()
        return dict(
            b.measure(trials(n)),
            scenario="SIGINT, then resume",
            sweep_id=sid,
            rc=rc,
            out=out,
            **said(out),
            stopped_s=stopped_s,
            running_at_fault=sorted(held),
            finished_at_fault=running(before, "FINISHED"),
            after_fault=after,
            parquet=parquet,
            resume_rc=resume_rc,
            resume_out=resume_out,
            resume_last_line=own_last_line(resume_out)[0],
            reused=_reused(after, end["runs"], after["runs"]),
            seconds_to_recover=recover,
            no_traceback=no_traceback(b),
        )


def driver_kill(work: Path, cache: Path | None = None) -> dict:
    """kill -9 of the driver mid-trial, its own Ray with it (as a crash of its machine would): its runs
    stay RUNNING, `sweeps` shows it interrupted at once (the driver's pid is gone), and resume adopts
    it without --force, reusing those runs."""
    n = 2
    with Bench(work, "driver-kill", cache) as b:
        sweep = b.start("sweep", b.sweep_args(n, EPOCHS), b.barrier_env())
        held, _ = b.hold_after(3, [sweep])
        fault = b.mark("fault")
        os.kill(sweep.pid, signal.SIGKILL)
        # The local Ray the driver started shares its fate, but not at once: a trial could still finish
        # meanwhile. Kill what is left of it too, so the trials in flight die in the middle of their runs.
        left = procs.kill_session(sweep.pid)
        rc = sweep.wait(30)
        b.mark("sweep ended")
        sid, after = b.sweep_id(), b.snapshot()
        rc_list, listed = b.run("sweeps", ["sweeps", "--tracking-uri", b.uri, "--json"], timeout=120)
        state = (
            next((s["status"] for s in json.loads(listed[listed.index("[") :]) if s["sweep_id"] == sid), None)
            if rc_list == 0
            else f"sweeps failed: {procs.last_line(listed)}"
        )
        resume_rc, resume_out = _resume(b, sid)
        recover = time.monotonic() - fault
        end = b.snapshot()
        return dict(
            b.measure(trials(n)),
            scenario="kill -9 driver, then resume",
            sweep_id=sid,
            rc=rc,
            after_fault=after,
            running_at_fault=sorted(held),
            left_behind=len(left),
            state_after_fault=state,
            resume_rc=resume_rc,
            resume_out=resume_out,
            resume_last_line=own_last_line(resume_out)[0],
            reused=_reused(after, end["runs"], after["runs"]),
            seconds_to_recover=recover,
            no_traceback=no_traceback(b),
        )


def worker_kill(work: Path, cache: Path | None = None) -> dict:
    """kill -9 of the process running a trial: Tune retries it (--max-retries 2) into the same run."""
    n = 2
    with Bench(work, "worker-kill", cache) as b:
        sweep = b.start("sweep", b.sweep_args(n, EPOCHS, "--max-retries", "2"), b.barrier_env())
        held, before = b.hold_after(0, [sweep])
        fault = b.mark("fault")
        victim = min(held)
        pid = held[victim]["pid"]
        killed = procs.cmdline(pid)
        os.kill(pid, signal.SIGKILL)
        b.release_all()
        rc = sweep.wait(300)
        b.mark("sweep ended")
        recover = time.monotonic() - fault
        out = sweep.output()
        m = b.measure(trials(n))
        return dict(
            m,
            scenario="kill -9 trial worker (retried)",
            sweep_id=b.sweep_id(),
            rc=rc,
            out=out,
            **said(out),
            killed=killed,
            victim=victim,
            running_at_fault=sorted(held),
            finished_at_fault=running(before, "FINISHED"),
            retried=sorted(k for k, a in m["attempts"].items() if a > 1),
            seconds_to_recover=recover,
            no_traceback=no_traceback(b),
        )


def node_loss(work: Path, cache: Path | None = None) -> dict:
    """A head and a worker node (1 CPU each); the worker node's processes killed while it runs a
    trial: that trial is retried on the head into the same run, and the sweep ends rc 0."""
    n = 2
    with Bench(work, "node-loss", cache) as b:
        # The GCS notices a dead node by missed health checks (default: 5 misses of a 3 s probe); a
        # shorter probe only makes the test wait less, the path is the same.
        env = dict(
            b.barrier_env(b.cluster_env()),
            RAY_health_check_period_ms="1000",
            RAY_health_check_failure_threshold="3",
        )
        with (
            procs.ray_head(b.logs, env, b.work, b.ray_tmp, num_cpus=1) as (gcs, _, head),
            procs.ray_worker(gcs, b.logs, env, b.work, b.ray_tmp, num_cpus=1) as worker,
        ):
            b.started += [worker, head]  # stopped by the context managers; what is left of them by the Bench
            # The sweep counts trial slots over the nodes alive when it starts: the worker must be in.
            procs.wait_for(
                "the worker node to join",
                lambda: "Ray runtime started" in worker.output(),
                90,
                [head, worker],
            )
            b.mark("cluster up")
            # The barrier's env reaches the trials through the nodes: their raylets start the workers.
            sweep = b.start("sweep", b.sweep_args(n, EPOCHS, "--address", gcs, "--cpus-per-trial", "1"), env)

            def on_worker():
                held = b.waiting()
                mine = set(procs.session_pids(worker.pid))
                return held and any(t["pid"] in mine for t in held.values()) and held

            held = procs.wait_for(
                "a trial held inside its run on the worker node",
                on_worker,
                240,
                [sweep, head, worker],
                interval=0.2,
            )
            before = b.snapshot()
            mine = set(procs.session_pids(worker.pid))
            victims = {t["pid"]: procs.cmdline(t["pid"]) for t in held.values() if t["pid"] in mine}
            fault = b.mark("fault")
            procs.kill_session(worker.pid)
            b.release_all()
            rc = sweep.wait(300)
            b.mark("sweep ended")
            recover = time.monotonic() - fault
            out = sweep.output()
            m = b.measure(trials(n))
            return dict(
                m,
                scenario="worker node lost",
                sweep_id=b.sweep_id(),
                rc=rc,
                out=out,
                **said(out),
                killed=sorted(victims.values()),
                running_at_fault=sorted(held),
                finished_at_fault=running(before, "FINISHED"),
                retried=sorted(k for k, a in m["attempts"].items() if a > 1),
                seconds_to_recover=recover,
                no_traceback=no_traceback(b),
            )


def mlflow_outage(work: Path, cache: Path | None = None) -> dict:
    """The tracking server dies mid-sweep and stays down past the client's retry budget: the sweep
    ends non-zero saying so and nothing is FINISHED without metrics; with the server back on the
    same port and database, resume (no --force: the driver is dead) completes the sweep."""
    n = 2
    with Bench(work, "mlflow-outage", cache) as b:
        artifacts, port = b.work / "mlartifacts", procs.free_port()
        # A short budget: one try, 5 s at most (MLflow's default, 7 retries with backoff, is ~4 minutes).
        # --max-retries 0: with the store gone every attempt fails alike; retries would only add time.
        short = dict(b.env, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
        with procs.mlflow_server(b.db, artifacts, b.logs, b.env, b.work, port=port) as (url, server):
            b.uri = url
            sweep = b.start("sweep", b.sweep_args(n, EPOCHS, "--max-retries", "0"), b.barrier_env(short))
            b.hold_after(3, [sweep, server])
            fault = b.mark("fault")
            procs.kill_session(server.pid)  # the server dies at once, all its processes
            b.release_all()  # the held trials end while it is down
        rc = sweep.wait(300)
        b.mark("sweep ended")
        down_s = time.monotonic() - fault
        out, sid = sweep.output(), b.sweep_id()
        after = b.snapshot()  # read from the server's database directly: the server is down
        with procs.mlflow_server(b.db, artifacts, b.logs, b.env, b.work, port=port) as (url, _):
            assert url == b.uri, (url, b.uri)
            # No --force: with its driver dead the sweep is interrupted, whatever its last heartbeat says.
            resume_rc, resume_out = _resume(b, sid)
            recover = time.monotonic() - fault
        end = b.snapshot()
        return dict(
            b.measure(trials(n)),
            scenario="MLflow server down > retry budget, then resume",
            sweep_id=sid,
            rc=rc,
            out=out,
            **said(out),
            down_s=down_s,
            after_fault=after,
            resume_rc=resume_rc,
            resume_out=resume_out,
            resume_last_line=own_last_line(resume_out)[0],
            reused=_reused(after, end["runs"], after["runs"]),
            seconds_to_recover=recover,
            no_traceback=no_traceback(b),
        )


FAILED_LINE = re.compile(r"^error: (\d+) of (\d+) trials failed; resume with: ca-flow resume (\S+)$", re.M)


def mlflow_blip(work: Path, cache: Path | None = None) -> dict:
    """The tracking server hangs (SIGSTOP) past the client's budget, then answers again before the
    sweep ends: trials that started meanwhile fail, some before they could make a run. The sweep must
    count every grid point it could not finish, with or without a run; resume completes it."""
    n = 4
    with Bench(work, "mlflow-blip", cache) as b:
        artifacts = b.work / "mlartifacts"
        short = dict(b.env, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="3")
        with procs.mlflow_server(b.db, artifacts, b.logs, b.env, b.work) as (url, server):
            b.uri = url
            sweep = b.start("sweep", b.sweep_args(n, EPOCHS, "--max-retries", "0"), b.barrier_env(short))
            b.hold_after(3, [sweep, server])
            fault = b.mark("fault")
            frozen = procs.session_pids(server.pid)
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            b.release_all()  # the held trials end while it hangs, and later ones start meanwhile
            try:
                # Long enough that trials fail in flight and new ones fail before they can make a run
                # (a new trial actor starts in a few seconds, then its first request times out after 3 s).
                time.sleep(20)
            finally:
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
            b.mark("server answers")
            rc = sweep.wait(300)
            b.mark("sweep ended")
            out, sid, after = sweep.output(), b.sweep_id(), b.snapshot()
            claimed = FAILED_LINE.search(out)
            resume_rc, resume_out = _resume(b, sid)
            recover = time.monotonic() - fault
        return dict(
            b.measure(trials(n)),
            scenario="MLflow server hangs, back mid-sweep, then resume",
            sweep_id=sid,
            rc=rc,
            out=out,
            **said(out),
            after_fault=after,
            claimed_failed=claimed.groups() if claimed else None,
            not_done=trials(n) - after["done"],
            without_run=trials(n) - len(after["runs"]),
            resume_rc=resume_rc,
            resume_out=resume_out,
            resume_last_line=own_last_line(resume_out)[0],
            seconds_to_recover=recover,
            no_traceback=no_traceback(b),
        )


def submit_stop(work: Path, cache: Path | None = None) -> dict:
    """`sweep --submit` to a head's job API returns at once; `status` follows the job through MLflow;
    `ray job stop` interrupts it (runs KILLED, resumable); resume completes it."""
    n = 2
    with Bench(work, "submit", cache) as b:
        # The job API answers only requests that carry the token; the barrier reaches the job's trials
        # through the head, whose raylet starts their workers.
        env = b.barrier_env(b.cluster_env())
        with procs.ray_head(b.logs, env, b.work, b.ray_tmp, num_cpus=2, dashboard=True) as (gcs, api, head):
            b.started.append(head)
            b.mark("head up")
            anonymous = anonymous_answer(api)
            t0 = time.monotonic()
            rc, out = b.run(
                "submit", b.sweep_args(n, EPOCHS) + ["--submit", "--address", api], timeout=120, env=env
            )
            submit_s = time.monotonic() - t0
            found = re.search(r"submitted job (\S+): sweep (\S+)", out)
            assert rc == 0 and found, out
            job, sid = found.groups()

            def ray_job(*verbs: str, timeout: float = 60) -> list[tuple[int, str]]:
                """`ray job VERB JOB` for each verb, at once: (exit code, stdout + stderr) each."""
                calls = [
                    subprocess.Popen(
                        [procs.RAY, "job", verb, job, "--address", api],
                        env=env,
                        cwd=b.work,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    for verb in verbs
                ]
                return [(c.returncode, e + o) for c in calls for o, e in [c.communicate(timeout=timeout)]]

            try:
                b.hold_after(1, [head])  # one trial finished, the next held: the sweep is running
                running_state = b.status(sid)
                fault = b.mark("fault")
                ((stop_rc, stop_out),) = ray_job("stop", timeout=150)
                procs.wait_for(
                    "the stopped job's sweep to close its runs",
                    lambda: b.snapshot()["parents"] != ["RUNNING"],
                    120,
                    [head],
                )
                after = b.snapshot()
                state = b.status(sid)["status"]
                (_, logs), (_, job_status) = ray_job("logs", "status")
                b.release_all()  # resume drives the same cluster: its trials pass the barrier
                resume_rc, resume_out = _resume(b, sid, "--address", gcs, env=env)
                recover = time.monotonic() - fault
                end = b.snapshot()
            finally:
                # The job's driver runs in a session of its own (Ray's job supervisor starts it so).
                for pid in procs.pids_matching(rf"--sweep-id {re.escape(sid)}\b"):
                    try:
                        job_sid = os.getsid(pid)
                    except ProcessLookupError:
                        continue
                    if job_sid != os.getsid(0):
                        procs.kill_session(job_sid)
        return dict(
            b.measure(trials(n)),
            scenario="submit, ray job stop, then resume",
            sweep_id=sid,
            job_id=job,
            anonymous_answer=anonymous,
            submit_out=out,
            submit_s=submit_s,
            status_running=running_state,
            stop_rc=stop_rc,
            stop_out=stop_out,
            after_fault=after,
            state_after_fault=state,
            job_last_line=own_last_line(logs)[0],
            job_logs=logs,
            job_status=job_status,
            resume_rc=resume_rc,
            resume_out=resume_out,
            resume_last_line=own_last_line(resume_out)[0],
            reused=_reused(after, end["runs"], after["runs"]),
            seconds_to_recover=recover,
            no_traceback=no_traceback(b, logs),
        )


SCENARIOS = dict(
    sigint=sigint,
    driver_kill=driver_kill,
    worker_kill=worker_kill,
    node_loss=node_loss,
    mlflow_outage=mlflow_outage,
    mlflow_blip=mlflow_blip,
    submit_stop=submit_stop,
)
COLUMNS = [
    "scenario",
    "trials",
    "finished",
    "lost",
    "duplicate runs",
    "stuck runs",
    "seconds to recover",
    "exit codes",
]


def exit_codes(r: dict) -> str:
    return " -> ".join(str(r[k]) for k in ("rc", "stop_rc", "resume_rc") if k in r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--work", default=None, help="keep everything here (default: a temp dir, removed)")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="ca-flow-faults-"))
    cache = work / "features"  # shared: every scenario samples the same images
    rows, results = [], {}
    for name in names:
        t0 = time.monotonic()
        try:
            r = results[name] = SCENARIOS[name](work / name, cache)
            rows.append(
                [
                    r["scenario"],
                    r["trials"],
                    r["finished"],
                    r["lost"],
                    r["duplicate_runs"],
                    r["stuck_runs"],
                    f"{r['seconds_to_recover']:.1f}",
                    exit_codes(r),
                ]
            )
        except BaseException as exc:  # pytest.fail raises a BaseException; one scenario must not end the rest
            if isinstance(exc, KeyboardInterrupt):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            rows.append([name, "-", "-", "-", "-", "-", "-", f"error: {first[:120]}"])
        print(f"{name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *rows)]
    for i, row in enumerate([COLUMNS, *rows]):
        print(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
        if i == 0:
            print("-|-".join("-" * w for w in widths))
    print(
        f"(textile, {procs.TINY_SWEEP[1]} {procs.TINY_SWEEP[3]} weights, shots {SHOTS}, seeds {SEEDS}; "
        f"work dir {work})"
    )
    if args.work:  # everything each scenario saw, the steps' times (marks) included
        (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
