"""`ca-flow ui`: the MLflow UI on the sweep's store, open on the latest sweep's runs in ca-flow's view.

A local store (SQLite, a database) gets `mlflow ui` on it, in a process group of its own, until Ctrl-C;
a tracking server already has its UI, so only the link is printed. Ctrl-C reaches `mlflow ui` as SIGTERM
to its group (it shuts uvicorn down cleanly in about 3 s, where SIGINT leaves tracebacks), waited for,
then whatever is left of the group is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import experiments, runs_table, tracking
from .cli_errors import fail
from .settings import UI_JOB_EXECUTION

START_S = 120  # a cold `mlflow ui` imports for tens of seconds on a busy machine
STOP_S = 10  # how long Ctrl-C may take before the group is killed


def latest_runs_link(client, base: str) -> str:
    """The latest sweep's experiment, set up for ca-flow's view (an older store may lack it), as a link."""
    found = runs_table.parents(client)
    if not found:
        fail("no sweep in this tracking store; run `ca-flow sweep` first, or pass --tracking-uri")
    exp = client.get_experiment(found[0].info.experiment_id)
    experiments.set_up(client, exp)
    return experiments.runs_url(base, exp.experiment_id)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def command(uri: str, port: int) -> list[str]:
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    db = tracking.sqlite_path(uri)
    if db is not None:  # where ca-flow's experiments keep their artifacts (experiments.experiment_id)
        cmd += ["--artifacts-destination", str(db.parent / "mlartifacts")]
    return cmd


def serve(client, uri: str, port: int, echo) -> int:
    """Print the runs link; on a local store, run `mlflow ui` until Ctrl-C. Returns the exit code."""
    if uri.startswith(("http://", "https://")):
        echo(f"runs: {latest_runs_link(client, uri)}")
        return 0
    if not port_free(port):
        fail(f"port {port} on 127.0.0.1 is in use (another MLflow UI?); pass --port with a free one")
    link = latest_runs_link(client, f"http://127.0.0.1:{port}")
    log = (
        tempfile.TemporaryFile()
    )  # its log, read only to say why it stopped (a pipe could fill and block it)
    # MLflow's job runner (GenAI judges; ca-flow has none) would start nine more processes that restart
    # when signalled: they doubled the start time here and kept the group alive past 10 s.
    env = {UI_JOB_EXECUTION.name: UI_JOB_EXECUTION.default, **os.environ}
    interrupted = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: interrupted.append(signum))
    proc = subprocess.Popen(
        command(uri, port),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_S
        while tracking.unreachable(f"http://127.0.0.1:{port}", timeout=2) is not None:
            if proc.poll() is not None:
                fail(f"mlflow ui exited with {proc.returncode} before it answered: {last_line(log)}")
            if interrupted:
                print("interrupted before the MLflow UI answered", file=sys.stderr)
                return 128 + interrupted[0]
            if time.monotonic() > deadline:
                fail(f"mlflow ui did not answer on port {port} within {START_S} s")
            time.sleep(0.25)
        echo(f"MLflow UI on {uri}\nruns: {link}\nCtrl-C stops it.")
        while proc.poll() is None and not interrupted:
            time.sleep(0.25)
        if not interrupted:
            fail(f"mlflow ui exited with {proc.returncode}: {last_line(log)}")
    finally:
        stop(proc)
        log.close()
    echo("MLflow UI stopped.")
    return 0


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the group, a wait, then SIGKILL to whatever of it is left (uvicorn's workers too)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def last_line(log) -> str:
    log.seek(0)
    lines = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"
