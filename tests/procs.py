"""Real processes for the end-to-end and fault tests: each in its own process group, on free ports,
waited for with a deadline that fails with the process's own output, and always stopped.

Only processes a test started are ever signalled (never `ray stop --force`, pkill or killall).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
CA_FLOW = shutil.which("ca-flow", path=str(BIN)) or shutil.which("ca-flow")
RAY = shutil.which("ray", path=str(BIN)) or shutil.which("ray")
MLFLOW = shutil.which("mlflow", path=str(BIN)) or shutil.which("mlflow")
SERVE_SH = Path(__file__).resolve().parent.parent / "mlflow" / "serve.sh"
TINY_SWEEP = ["--backbone", "ca-flow-tiny", "--pretrained", "random"]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all held at once while picked, since the kernel may hand the same
    ephemeral port to two sockets picked one after the other."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(home: Path, **extra) -> dict:
    """This environment minus anything pointing the CLI at another cluster or store; own HOME."""
    env = dict(os.environ)
    for name in (
        "RAY_ADDRESS",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_EXPERIMENT_NAME",
        "CA_FLOW_DATA_ROOT",
        "RAY_AUTH_MODE",
    ):
        env.pop(name, None)
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


class Proc:
    """A process started in its own session (process group), with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict, cwd: Path):
        self.name, self.cmd, self.log = name, cmd, log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        """To the leader only (what a terminal's Ctrl-C reaches first is the foreground process)."""
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout:.0f} s:\n{tail(self.log)}")

    def stop(self, leader_only: bool = False, graceful_s: float = 5.0) -> None:
        """SIGTERM (to the leader, or the group), then SIGKILL to whatever is left in the group."""
        if self.alive():
            try:
                if leader_only:
                    self.popen.send_signal(signal.SIGTERM)
                else:
                    os.killpg(self.pid, signal.SIGTERM)
                self.popen.wait(graceful_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while group_pids(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def group_pids(pgid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_for(what: str, check, timeout: float, procs: list[Proc] = (), interval: float = 0.25):
    """Poll `check()` until truthy; a watched process that dies, or the deadline, fails with its log."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        for p in procs:
            if not p.alive():
                pytest.fail(
                    f"{p.name} exited with {p.popen.returncode} while waiting for {what}:\n{tail(p.log)}"
                )
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}:\n{tail(p.log)}" for p in procs)
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(interval)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


BIND_FAILED = re.compile(
    r"address already in use|Errno 98|failed to bind|Port .* is (already )?in use"
    r"|port number \d+ that is used by other components",
    re.I,
)


@contextmanager
def mlflow_server(db: Path, artifacts: Path, logs: Path, env: dict, cwd: Path, port: int | None = None):
    """The tracking server as users start it (mlflow/serve.sh, one uvicorn worker) on SQLite, retried
    on another port if the one picked was taken meanwhile. Yields (url, Proc)."""
    import mlflow

    # The schema here, at once (serve.sh would run `mlflow db upgrade`, one more process to start).
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()
    for attempt in range(3):
        p = port or free_port()
        server_env = dict(
            env,
            BACKEND_STORE_URI=f"sqlite:///{db}",
            ARTIFACTS_DESTINATION=str(artifacts),
            HOST="127.0.0.1",
            PORT=str(p),
            WORKERS="1",
            MLFLOW_BIN=MLFLOW,
        )
        proc = Proc(
            "mlflow server", ["bash", str(SERVE_SH)], logs / f"mlflow-{p}-{attempt}.log", server_env, cwd
        )
        url = f"http://127.0.0.1:{p}"
        deadline = time.monotonic() + 90
        while not healthy(url) and proc.alive() and time.monotonic() < deadline:
            time.sleep(0.25)
        if healthy(url):
            break
        proc.stop(graceful_s=1)
        if port or not BIND_FAILED.search(proc.output()):
            pytest.fail(f"mlflow server did not come up on {url}:\n{tail(proc.log)}")
    try:
        yield url, proc
    finally:
        proc.stop(graceful_s=1)  # uvicorn would wait for keep-alive connections to close


def ray_temp_dir() -> Path:
    # Ray's unix sockets live under its temp dir: keep the path short (sun_path is 107 bytes).
    return Path(tempfile.mkdtemp(prefix="caf-ray-", dir="/tmp"))


NODE_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)


def _node_port_flags(ports: list[int]) -> list[str]:
    return [f"--{flag}={port}" for flag, port in zip(NODE_PORTS, ports, strict=True)]


@contextmanager
def ray_head(logs: Path, env: dict, cwd: Path, temp_dir: Path, num_cpus: int = 1, dashboard: bool = False):
    """`ray start --head --block` on free ports, retried if a port was taken meanwhile. Yields
    (GCS address, dashboard/job API url or None, Proc)."""
    for attempt in range(3):
        gcs, dash, client, *node = free_ports(3 + len(NODE_PORTS))
        cmd = [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            f"--ray-client-server-port={client}",
            *_node_port_flags(node),
        ]
        cmd += (
            ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
            if dashboard
            else ["--include-dashboard=false"]
        )
        proc = Proc("ray head", cmd, logs / f"head-{attempt}.log", env, cwd)
        deadline = time.monotonic() + 60
        while proc.alive() and not port_open(gcs) and time.monotonic() < deadline:
            time.sleep(0.25)
        if port_open(gcs) and (not dashboard or _wait_port(dash, proc, 60)):
            break
        proc.stop(leader_only=True)
        if not BIND_FAILED.search(proc.output()) or attempt == 2:
            pytest.fail(f"ray head did not come up:\n{tail(proc.log)}")
    try:
        yield f"127.0.0.1:{gcs}", (f"http://127.0.0.1:{dash}" if dashboard else None), proc
    finally:
        # SIGTERM to the leader: `ray start --block` shuts its node down itself.
        proc.stop(leader_only=True)


def _wait_port(port: int, proc: Proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc.alive() and time.monotonic() < deadline:
        if port_open(port):
            return True
        time.sleep(0.25)
    return port_open(port)


@contextmanager
def ray_worker(address: str, logs: Path, env: dict, cwd: Path, temp_dir: Path, num_cpus: int = 1):
    """`ray start --block` joining `address`, on free ports, retried if a port was taken meanwhile."""
    for attempt in range(3):
        proc = Proc(
            "ray worker",
            [
                RAY,
                "start",
                "--block",
                f"--address={address}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
                *_node_port_flags(free_ports(len(NODE_PORTS))),
            ],
            logs / f"worker-{attempt}.log",
            env,
            cwd,
        )
        deadline = time.monotonic() + 60
        while proc.alive() and "Ray runtime started" not in proc.output() and time.monotonic() < deadline:
            time.sleep(0.25)
        if proc.alive() and "Ray runtime started" in proc.output():
            break
        proc.stop(leader_only=True)
        if not BIND_FAILED.search(proc.output()) or attempt == 2:
            pytest.fail(f"ray worker did not come up:\n{tail(proc.log)}")
    try:
        yield proc
    finally:
        proc.stop(leader_only=True)


@contextmanager
def model_server(model_uri: str, logs: Path, env: dict, cwd: Path):
    """`mlflow models serve` on a free port, retried on another one if that was taken meanwhile.
    Yields the server's url."""
    env = dict(env, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # it runs `uvicorn` from this venv
    for attempt in range(3):
        port = free_port()
        proc = Proc(
            "mlflow models serve",
            [
                MLFLOW,
                "models",
                "serve",
                "-m",
                model_uri,
                "--env-manager",
                "local",
                "-p",
                str(port),
                "-h",
                "127.0.0.1",
            ],
            logs / f"serve-{attempt}.log",
            env,
            cwd,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while proc.alive() and not _answers(f"{url}/ping") and time.monotonic() < deadline:
            time.sleep(0.25)
        if _answers(f"{url}/ping"):
            break
        proc.stop(graceful_s=1)
        if not BIND_FAILED.search(proc.output()) or attempt == 2:
            pytest.fail(f"mlflow models serve did not come up on {url}:\n{tail(proc.log)}")
    try:
        yield url
    finally:
        proc.stop(graceful_s=1)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def ca_flow(args: list[str], log: Path, env: dict, cwd: Path) -> Proc:
    """The CLI as a user runs it: its own process (group), real signals reach it."""
    return Proc("ca-flow " + args[0], [CA_FLOW, *args], log, env, cwd)


def run_cli(args: list[str], env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([CA_FLOW, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# -- reading the store afterwards ------------------------------------------------------------------


def runs_of(uri: str, experiment: str):
    """(parents, children) of an experiment, read with MLflow's own client."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {uri}"
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def assert_sweep_complete(uri: str, experiment: str, expected_trials: int) -> dict:
    """One parent, one FINISHED run with metrics per grid point, nothing left SCHEDULED or RUNNING,
    no duplicate trial keys. Returns counts for the caller's own checks."""
    parents, children = runs_of(uri, experiment)
    assert len(parents) == 1, [(p.info.run_name, p.info.status) for p in parents]
    keys = [c.data.tags.get("ca_flow.trial_key") for c in children]
    stuck = [c.info.run_name for c in children if c.info.status in ("SCHEDULED", "RUNNING")]
    assert not stuck, f"runs left SCHEDULED/RUNNING: {stuck}"
    assert len(keys) == len(set(keys)), (
        f"duplicate trial keys: {sorted(k for k in keys if keys.count(k) > 1)}"
    )
    not_done = [
        (c.info.run_name, c.info.status)
        for c in children
        if c.info.status != "FINISHED" or not {"val_acc", "test_acc"} <= set(c.data.metrics)
    ]
    assert not not_done, f"runs not finished with metrics: {not_done}"
    assert len(children) == expected_trials, (len(children), expected_trials)
    assert parents[0].info.status == "FINISHED", parents[0].info.status
    return dict(parent=parents[0], children=children)


# -- whole sessions: what a process and everything it spawned became --------------------------------
# Ray puts each of its worker processes in a process group of its own, so a group kill misses them;
# they stay in the session of the process that started Ray (a Proc leader: its sid is its pid).


def stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()  # state, ppid, pgrp, session, ...


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def session_pids(sid: int) -> list[int]:
    """Every live process (not a zombie) in session `sid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields and fields[3] == str(sid) and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def pids_matching(pattern: str, sid: int | None = None) -> dict[int, str]:
    """pid -> command line of the processes (of session `sid`, if given) whose command line matches."""
    rx = re.compile(pattern)
    pids = (
        session_pids(sid)
        if sid is not None
        else [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    )
    found = {}
    for pid in pids:
        cmd = cmdline(pid)
        if pid != os.getpid() and rx.search(cmd):
            found[pid] = cmd[:200]
    return found


def kill_session(sid: int, timeout: float = 15.0) -> list[int]:
    """SIGKILL every process of session `sid` (one a test started) until none is left; returns the
    pids that were still there."""
    found = session_pids(sid)
    deadline = time.monotonic() + timeout
    while True:
        pids = session_pids(sid)
        if not pids or time.monotonic() > deadline:
            return found
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- many CLI invocations, each in a fresh process, for the cost of one start ----------------------

FORKED = r"""
import contextlib, io, json, os, sys
from workflows.cli import app
cases, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = []
for argv, env in cases:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child with only the CLI imported, as a fresh `ca-flow` process has
        os.close(r)
        os.environ.update(env)
        err, code = io.StringIO(), 0
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                app(argv, prog_name="ca-flow")
            except SystemExit as exc:
                code = exc.code
        os.write(w, json.dumps([code, sorted(m for m in heavy if m in sys.modules), err.getvalue()]).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.waitpid(pid, 0)
    out.append(json.loads(data))
print("FORKED " + json.dumps(out))
"""


def forked_cli(cases: list[tuple[list[str], dict]], cwd: Path, heavy) -> list[tuple[int, list[str], str]]:
    """(exit code, heavy modules loaded, stderr) for each (argv, extra environment): one interpreter
    imports the CLI, and each case runs in a fork of it."""
    done = subprocess.run(
        [sys.executable, "-c", FORKED, json.dumps(cases), json.dumps(list(heavy))],
        cwd=cwd,
        env=clean_env(cwd / "home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("FORKED ")]
    assert lines, done.stderr[-3000:]
    return [tuple(r) for r in json.loads(lines[-1][len("FORKED ") :])]
