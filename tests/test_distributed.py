"""End to end on real processes: an MLflow tracking server, a Ray head plus a separate worker node,
and the `ca-flow` CLI as a subprocess. No mocks.

Every process started here runs in its own process group (start_new_session=True) and is stopped by
killing that group, never with `ray stop --force` (which would also kill other Ray instances on this
machine, e.g. the session's `ray_local` fixture). The test process itself never calls `ray.init`:
cluster state is read by short `python -c` subprocesses.
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
import textwrap
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
CA_FLOW = shutil.which("ca-flow", path=str(BIN)) or shutil.which("ca-flow")
RAY = shutil.which("ray", path=str(BIN)) or shutil.which("ray")
MLFLOW = shutil.which("mlflow", path=str(BIN)) or shutil.which("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home: Path | None = None) -> dict:
    """The test session's environment (RAY_AUTH_MODE=disabled from conftest) minus anything that
    would point the CLI at another cluster or store."""
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                 "MLFLOW_EXPERIMENT_NAME", "CA_FLOW_DATA_ROOT"):
        env.pop(name, None)
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    if home is not None:  # keep ~/ray_results and friends out of the real HOME
        env["HOME"] = str(home)
    return env


def wait_for(what: str, check, timeout: float, interval: float = 0.25, procs=()):
    """Poll `check()` until it returns something truthy; fail early if a watched process died."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        for name, proc, log in procs:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} while waiting for {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def group_pids(pgid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def pids_matching(pattern: str) -> dict[int, str]:
    """pid -> command line of every process (but this one) whose command line matches `pattern`."""
    found, rx = {}, re.compile(pattern)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if rx.search(cmd) and "pgrep" not in cmd:
            found[int(entry.name)] = cmd[:200]
    return found


def stop_group(proc: subprocess.Popen, leader_only: bool, graceful_s: float = 5.0) -> None:
    """Stop a process started with start_new_session=True and everything in its process group.

    SIGTERM first, then SIGKILL sweeps whatever is left in the group. For `ray start --block` the
    SIGTERM goes to the leader only: it shuts its node down itself, whereas a group-wide SIGTERM kills
    the GCS first and leaves the leader waiting ~30 s to drain. `mlflow server` ignores SIGTERM
    until its uvicorn child exits, so there the whole group gets it.
    """
    pgid = proc.pid  # a session leader's pgid is its pid
    if proc.poll() is None:
        try:
            if leader_only:
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(pgid, signal.SIGTERM)
            proc.wait(graceful_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


@contextmanager
def process_group(cmd: list[str], log: Path, env: dict, cwd: Path, leader_only: bool, graceful_s: float = 5.0):
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    try:
        yield proc
    finally:
        stop_group(proc, leader_only, graceful_s)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


# Run in a subprocess so this test process never joins (or initialises) a Ray cluster.
CLUSTER_PROBE = textwrap.dedent("""
    import json, logging, sys, time
    import ray
    from ray._private import state
    address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    deadline = time.monotonic() + timeout
    while True:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        if len(nodes) >= want or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    actors = [dict(cls=a.get("ActorClassName", ""), node=(a.get("Address") or {}).get("NodeID", ""),
                   state=a.get("State"))
              for a in state.actors().values()]
    print(json.dumps(dict(nodes=[dict(id=n["NodeID"], cpu=n["Resources"].get("CPU", 0),
                                      head="node:__internal_head__" in n["Resources"]) for n in nodes],
                          actors=actors)))
    ray.shutdown()
""")


def probe_cluster(address: str, env: dict, cwd: Path, want: int = 2, timeout: float = 60) -> dict:
    r = subprocess.run([sys.executable, "-c", CLUSTER_PROBE, address, str(want), str(timeout)],
                       capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout + 60)
    assert r.returncode == 0, f"cluster probe failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sweep_on_separate_head_and_worker_with_tracking_server(tmp_path):
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from workflows.promote import rank_key

    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    # Ray's unix sockets live under the temp dir: keep its path short (sun_path is 107 bytes).
    ray_tmp = Path(tempfile.mkdtemp(prefix="caf-ray-", dir="/tmp"))
    db, artifacts = tmp_path / "mlflow.db", tmp_path / "mlartifacts"
    mlflow_port, gcs_port = free_port(), free_port()
    uri, address = f"http://127.0.0.1:{mlflow_port}", f"127.0.0.1:{gcs_port}"
    ours = rf"{re.escape(str(ray_tmp))}|[:=]{gcs_port}\b|[:=]{mlflow_port}\b"
    assert not pids_matching(ours), "the ports just picked are in use by another process"

    # The schema once, here, before the server's workers could race to migrate a fresh file.
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()

    logs = tmp_path / "logs"
    logs.mkdir()
    t0, marks = time.monotonic(), []

    def mark(what):
        marks.append(f"{what} {time.monotonic() - t0:.1f}")

    try:
        with process_group([MLFLOW, "server", "--backend-store-uri", f"sqlite:///{db}",
                            "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
                            "--port", str(mlflow_port), "--workers", "1"],
                           # uvicorn would wait for the test's keep-alive connections to close.
                           logs / "mlflow.log", env, tmp_path, leader_only=False, graceful_s=1.0) as server, \
             process_group([RAY, "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=1",
                            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmp}",
                            # Ray's fixed defaults (10001, 52365) would collide with other local clusters.
                            f"--ray-client-server-port={free_port()}",
                            f"--dashboard-agent-listen-port={free_port()}"],
                           logs / "head.log", env, tmp_path, leader_only=True) as head:
            wait_for("the Ray head's GCS port", lambda: port_open(gcs_port), 60,
                     procs=[("ray head", head, logs / "head.log")])
            with process_group([RAY, "start", "--block", f"--address={address}", "--num-cpus=1",
                                "--disable-usage-stats", f"--temp-dir={ray_tmp}",
                                f"--dashboard-agent-listen-port={free_port()}"],
                               logs / "worker.log", env, tmp_path, leader_only=True) as worker:
                watched = [("mlflow server", server, logs / "mlflow.log"), ("ray head", head, logs / "head.log"),
                           ("ray worker", worker, logs / "worker.log")]
                before = probe_cluster(address, env, tmp_path)
                mark("2 nodes")
                assert len(before["nodes"]) == 2, f"want a head and a worker node, got {before['nodes']}"
                assert sorted(n["head"] for n in before["nodes"]) == [False, True]
                assert all(n["cpu"] == 1 for n in before["nodes"])
                wait_for(f"MLflow server {uri}/health", lambda: healthy(uri), 90, procs=watched)
                mark("health")

                started = time.monotonic()
                sweep = subprocess.run(
                    [CA_FLOW, "sweep", "--datasets", "textile", "--backbone", "ca-flow-tiny",
                     "--pretrained", "random", "--shots", "1,2", "--seeds", "1", "--alphas", "0.2,0.6", "--methods", "clip-adapter",
                     "--epochs", "5", "--augment-views", "2", "--address", address,
                     "--tracking-uri", uri, "--experiment", "dist",
                     "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "results")],
                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
                sweep_s = time.monotonic() - started
                mark("sweep")
                assert sweep.returncode == 0, (f"sweep failed ({sweep_s:.0f} s):\n{sweep.stdout[-4000:]}\n"
                                               f"{sweep.stderr[-4000:]}")
                assert "4 trials, 0 failed" in sweep.stdout, sweep.stdout[-2000:]

                # Both nodes stayed in the cluster, and the trials' actors ran on both of them
                # (two 1-CPU nodes, two concurrent 1-CPU trials: one per node).
                after = probe_cluster(address, env, tmp_path)
                mark("probe")
                node_ids = {n["id"] for n in after["nodes"]}
                assert len(node_ids) == 2, after["nodes"]
                trial_actors = [a for a in after["actors"] if "run_trial" in a["cls"] or "ImplicitFunc" in a["cls"]]
                assert trial_actors, f"no Tune trial actors in the GCS actor table: {after['actors']}"
                assert {a["node"] for a in trial_actors} == node_ids, trial_actors

                # Tracking: one parent, four finished children, everything through the server.
                client = mlflow.MlflowClient(uri)
                exp = client.get_experiment_by_name("dist")
                assert exp is not None
                assert exp.artifact_location.startswith("mlflow-artifacts:/"), exp.artifact_location
                runs = client.search_runs([exp.experiment_id], max_results=100)
                parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
                children = [r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags]
                assert len(parents) == 1 and len(children) == 4, [(r.info.run_name, r.data.tags) for r in runs]
                parent = parents[0]
                assert parent.info.status == "FINISHED"
                assert parent.info.run_id in sweep.stdout
                assert {r.data.tags[MLFLOW_PARENT_RUN_ID] for r in children} == {parent.info.run_id}
                assert len({r.data.tags["ca_flow.trial_key"] for r in children}) == 4
                assert {(r.data.params["shots"], r.data.params["alpha"]) for r in children} == {
                    ("1", "0.2"), ("1", "0.6"), ("2", "0.2"), ("2", "0.6")}
                for run in children:
                    assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
                    for metric in ("val_acc", "test_acc", "zs_test_acc"):
                        assert metric in run.data.metrics, (run.info.run_name, run.data.metrics)
                        assert 0.0 <= run.data.metrics[metric] <= 1.0
                    model_uri = run.data.tags["ca_flow.model_uri"]
                    assert model_uri.startswith("models:/m-"), model_uri
                    model = client.get_logged_model(model_uri.split("/")[-1])
                    assert model.source_run_id == run.info.run_id
                    assert model.artifact_location.startswith("mlflow-artifacts:/"), model.artifact_location
                    # The server proxied the upload: the files are in its --artifacts-destination.
                    local = artifacts / model.artifact_location[len("mlflow-artifacts:/"):].lstrip("/")
                    assert (local / "MLmodel").is_file(), sorted(str(p) for p in artifacts.rglob("*"))[:50]
                    assert list((local / "artifacts").rglob("adapter.safetensors")), sorted(local.rglob("*"))
                # The sweep's Parquet, logged on the parent run, went through the server too.
                parquet = [a.path for a in client.list_artifacts(parent.info.run_id) if a.path.endswith(".parquet")]
                assert len(parquet) == 1, parquet
                assert list(artifacts.rglob(parquet[0])), sorted(str(p) for p in artifacts.rglob("*"))[:50]
                # Nothing fell back to a local store in the CLI's working directory.
                assert not (tmp_path / "mlruns").exists()

                promoted = subprocess.run([CA_FLOW, "promote", "--experiment", "dist", "--tracking-uri", uri],
                                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
                mark("promote")
                assert promoted.returncode == 0, f"{promoted.stdout[-3000:]}\n{promoted.stderr[-3000:]}"
                version = client.get_model_version_by_alias("clip-adapter-textile", "champion")
                best = min(children, key=rank_key)  # best val_acc, ties broken as `promote` documents
                assert version.run_id == best.info.run_id, (version.run_id, best.info.run_id)
                assert version.tags.get("val_acc") == str(best.data.metrics["val_acc"])
            assert not group_pids(worker.pid), "the worker node's processes outlived the teardown"
        assert not group_pids(head.pid), "the head node's processes outlived the teardown"
        assert not group_pids(server.pid), "the MLflow server's processes outlived the teardown"
        mark("teardown")
        print(f"\n{Path(__file__).name}: seconds since start: " + ", ".join(marks))
    finally:
        # Nothing started for this test may survive it, whatever happened above.
        deadline = time.monotonic() + 15
        while pids_matching(ours) and time.monotonic() < deadline:
            time.sleep(0.2)
        strays = pids_matching(ours)
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not strays, f"processes left behind by the test: {strays}"


@pytest.mark.slow
def test_unreachable_tracking_server_is_one_line_error(tmp_path):
    port = free_port()  # bound and released: nobody listens on it
    uri = f"http://127.0.0.1:{port}"
    r = subprocess.run(
        [CA_FLOW, "sweep", "--datasets", "textile", "--backbone", "ca-flow-tiny", "--pretrained", "random",
         "--tracking-uri", uri, "--shots", "1", "--seeds", "1", "--alphas", "0.2",
         "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "results")],
        cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"want one line on stderr, got {len(lines)}:\n{r.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    assert uri in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    # It failed before starting Ray or writing anything.
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "ray_results").exists()
