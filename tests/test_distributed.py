"""End to end on real processes: an MLflow tracking server, a Ray head plus a separate worker node,
and the `ca-flow` CLI as a subprocess. No mocks; Ray keeps its default token auth (the head, the
worker and the CLI share this test's HOME, where the token lives).

Every process started here runs in its own process group and is stopped by killing that group
(tests/procs.py), never with `ray stop --force`. The test process itself never joins the cluster:
cluster state is read by short `python -c` subprocesses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from procs import (
    RAY,
    TINY_SWEEP,
    clean_env,
    free_port,
    group_pids,
    mlflow_server,
    ray_head,
    ray_temp_dir,
    ray_worker,
    run_cli,
    runs_of,
)

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
    actors = [dict(cls=a.get("ActorClassName", ""), node=(a.get("Address") or {}).get("NodeID", ""))
              for a in state.actors().values()]
    print(json.dumps(dict(nodes=[dict(id=n["NodeID"], cpu=n["Resources"].get("CPU", 0),
                                      head="node:__internal_head__" in n["Resources"]) for n in nodes],
                          actors=actors)))
    ray.shutdown()
""")


def probe_cluster(address: str, env: dict, cwd, want: int = 2, timeout: float = 60) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CLUSTER_PROBE, address, str(want), str(timeout)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout + 60,
    )
    assert r.returncode == 0, f"cluster probe failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def best_by_rule(children):
    """The documented rule, written out: best val_acc; ties more shots, lower seed, lower alpha."""
    return sorted(
        children,
        key=lambda r: (
            -r.data.metrics["val_acc"],
            -int(r.data.params["shots"]),
            int(r.data.params["seed"]),
            float(r.data.params["alpha"]),
        ),
    )[0]


@pytest.mark.slow
def test_sweep_on_separate_head_and_worker_with_tracking_server(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    logs = tmp_path / "logs"
    logs.mkdir()
    ray_tmp = ray_temp_dir()
    artifacts = tmp_path / "mlartifacts"
    try:
        with (
            mlflow_server(tmp_path / "mlflow.db", artifacts, logs, env, tmp_path) as (uri, server),
            ray_head(logs, env, tmp_path, ray_tmp) as (address, _, head),
            ray_worker(address, logs, env, tmp_path, ray_tmp) as worker,
        ):
            before = probe_cluster(address, env, tmp_path)
            assert sorted(n["head"] for n in before["nodes"]) == [False, True], before["nodes"]
            assert all(n["cpu"] == 1 for n in before["nodes"])

            sweep = run_cli(
                [
                    "sweep",
                    "--datasets",
                    "textile",
                    *TINY_SWEEP,
                    "--shots",
                    "1,2",
                    "--seeds",
                    "1",
                    "--alphas",
                    "0.2,0.6",
                    "--methods",
                    "clip-adapter",
                    "--epochs",
                    "5",
                    "--augment-views",
                    "2",
                    "--address",
                    address,
                    "--tracking-uri",
                    uri,
                    "--experiment",
                    "dist",
                    "--cache-dir",
                    str(tmp_path / "cache"),
                    "--results-dir",
                    str(tmp_path / "results"),
                    "--storage-path",
                    str(tmp_path / "ray_results"),
                ],
                env,
                tmp_path,
            )
            assert sweep.returncode == 0, f"sweep failed:\n{sweep.stdout[-4000:]}\n{sweep.stderr[-4000:]}"
            assert "4 trials, 0 failed" in sweep.stdout, sweep.stdout[-2000:]

            # Both nodes stayed, and the trials' actors ran on both (two 1-CPU nodes, two 1-CPU trials).
            after = probe_cluster(address, env, tmp_path)
            node_ids = {n["id"] for n in after["nodes"]}
            assert len(node_ids) == 2, after["nodes"]
            trial_actors = [
                a for a in after["actors"] if "ImplicitFunc" in a["cls"] or "run_trial" in a["cls"]
            ]
            assert {a["node"] for a in trial_actors} == node_ids, trial_actors

            # Tracking: one parent, four finished children, everything through the server.
            import mlflow

            client = mlflow.MlflowClient(uri)
            parents, children = runs_of(uri, "dist")
            assert len(parents) == 1 and len(children) == 4
            parent = parents[0]
            assert parent.info.status == "FINISHED" and parent.info.run_id in sweep.stdout
            assert client.get_experiment_by_name("dist").artifact_location.startswith("mlflow-artifacts:/")
            assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
            assert len({r.data.tags["ca_flow.trial_key"] for r in children}) == 4
            assert {(r.data.params["shots"], r.data.params["alpha"]) for r in children} == {
                ("1", "0.2"),
                ("1", "0.6"),
                ("2", "0.2"),
                ("2", "0.6"),
            }
            for run in children:
                assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
                assert all(0.0 <= run.data.metrics[m] <= 1.0 for m in ("val_acc", "test_acc", "zs_test_acc"))
                # The server proxied the upload: the adapter's files are in its --artifacts-destination.
                assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
                local = artifacts / run.info.artifact_uri[len("mlflow-artifacts:/") :].lstrip("/") / "adapter"
                assert sorted(p.name for p in local.iterdir()) == ["adapter.json", "adapter.safetensors"]
            parquet = [
                a.path for a in client.list_artifacts(parent.info.run_id) if a.path.endswith(".parquet")
            ]
            assert len(parquet) == 1 and list(artifacts.rglob(parquet[0]))
            assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db-journal").exists()

            promoted = run_cli(["promote", "--experiment", "dist", "--tracking-uri", uri], env, tmp_path, 180)
            assert promoted.returncode == 0, f"{promoted.stdout[-3000:]}\n{promoted.stderr[-3000:]}"
            version = client.get_model_version_by_alias("clip-adapter-textile", "champion")
            want = best_by_rule(children)
            assert (
                version.run_id == want.info.run_id
                and float(version.tags["val_acc"]) == want.data.metrics["val_acc"]
            )
            assert version.source.startswith("models:/m-")
            pids = [(p.name, p.pid) for p in (worker, head, server)]
        for name, pid in pids:
            assert not group_pids(pid), f"the {name}'s processes outlived the teardown"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_unreachable_addresses_fail_fast_with_one_line(tmp_path):
    env = clean_env(tmp_path)
    for args, says in (
        (["--tracking-uri", f"http://127.0.0.1:{free_port()}"], "is unreachable"),
        (["--address", f"127.0.0.1:{free_port()}"], "nothing answers at Ray address"),
    ):
        r = run_cli(
            [
                "sweep",
                "--datasets",
                "textile",
                *TINY_SWEEP,
                "--shots",
                "1",
                "--seeds",
                "1",
                "--alphas",
                "0.2",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--results-dir",
                str(tmp_path / "results"),
                *args,
            ],
            env,
            tmp_path,
            timeout=30,
        )  # "within 30 s": a hang fails the test by timing out
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], (
            r.stderr
        )
        assert "Traceback" not in r.stdout + r.stderr
        assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_client_without_the_clusters_token_gets_one_line(tmp_path):
    """A cluster with token auth, set up as cluster/README.md says, and a CLI whose HOME has no token."""
    cluster_home, client_home, logs = tmp_path / "cluster", tmp_path / "client", tmp_path / "logs"
    for d in (cluster_home, client_home, logs):
        d.mkdir()
    env = clean_env(cluster_home)
    subprocess.run(
        [RAY, "get-auth-token", "--generate"],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    env["RAY_AUTH_MODE"] = "token"
    ray_tmp = ray_temp_dir()
    try:
        with ray_head(logs, env, tmp_path, ray_tmp) as (address, _, head):
            r = run_cli(
                [
                    "sweep",
                    "--datasets",
                    "textile",
                    *TINY_SWEEP,
                    "--shots",
                    "1",
                    "--seeds",
                    "1",
                    "--alphas",
                    "0.2",
                    "--address",
                    address,
                    "--cache-dir",
                    str(tmp_path / "cache"),
                    "--results-dir",
                    str(tmp_path / "results"),
                ],
                clean_env(client_home),
                tmp_path,
                timeout=180,
            )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0] == (
        f"error: the Ray cluster at {address} refused this client: it needs the cluster's token "
        f"and token mode, see cluster/README.md (Token authentication)"
    ), lines[0]
    assert "Traceback" not in r.stdout + r.stderr
