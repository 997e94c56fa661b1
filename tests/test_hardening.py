"""Hardening through the real CLI, on real sweeps.

Two sweeps start at once in their own processes, with Ray's default auth, and create one fresh store:
their Ray must refuse callers without its token. While they run: a sweep whose every trial fails (in
this process) and many processes creating a store and an experiment at once. Their store then carries
quotes, backslashes and unicode in dataset and experiment names through report, promote and predict;
the champion moves only to a better run; shots a class cannot give are refused or logged truly; the
registered model pins what it needs; paths are read only under an allow-listed root. Last, a sweep
whose weights cannot load offline (inside a Ray task) ends in one line.

Argument errors that answer before anything starts are in test_cli_errors.py. The served model's
refusals over HTTP (a path, bad base64, top_k 0) are in test_cli.py, decompression bombs and damaged
feature-store shards in test_features.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from procs import CA_FLOW, clean_env, runs_of, wait_for
from typer.testing import CliRunner

from clip_adapter.backbone import TINY
from workflows.cli import app

runner = CliRunner()
COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}  # labels 0, 1, 2
ROTATE = {"blue": "green", "green": "red", "red": "blue"}
EXP_A, EXP_B = 'it\'s "A" \\ ünï', "B"
QUOTED = ["o'brien", "back\\slash", "ünï"]
FAST = [
    "--backbone",
    TINY,
    "--pretrained",
    "random",
    "--seeds",
    "1",
    "--augment-views",
    "1",
    "--max-retries",
    "0",
]
REPO = Path(__file__).resolve().parents[1]


def coop_dataset(
    folder: Path, counts=(4, 2, 2), train_shows=None, broken_train=False, per_class=None
) -> Path:
    """A dataset with its own CoOp split file: counts = (train, val, test) images per class.

    train_shows: class -> the colour its train images show (labels wrong on purpose);
    broken_train: every train image is undecodable; per_class: class -> its number of train images."""
    rng = np.random.default_rng(len(folder.name))
    split = {"train": [], "val": [], "test": []}
    for label, (name, rgb) in enumerate(COLOURS.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        n_train = (per_class or {}).get(name, counts[0])
        for part, n in (("train", n_train), ("val", counts[1]), ("test", counts[2])):
            for i in range(n):
                rel = f"{name}/{part}_{i:02d}.png"
                if part == "train" and broken_train:
                    (folder / rel).write_bytes(b"\x89PNG not really")
                else:
                    shown = COLOURS[(train_shows or {}).get(name, name)] if part == "train" else rgb
                    pixels = np.clip(np.array(shown) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(
                        np.uint8
                    )
                    Image.fromarray(pixels).save(folder / rel)
                split[part].append([rel, label, name])
    (folder / "split_ca_flow.json").write_text(json.dumps(split))
    return folder


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: enough for a decoder to refuse it as a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def invoke(args: list) -> object:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    return result


def ok(args: list):
    result = invoke(args)
    assert result.exit_code == 0, (args, result.output, result.stderr)
    return result


# -- sweeps in their own processes, with Ray's default auth -----------------------------------------


class Sweep:
    """`ca-flow sweep` as a user runs it: own process group, own HOME (Ray's token) and Ray temp dir."""

    def __init__(self, name: str, args: list, work: Path, **env):
        self.home = work / f"home-{name}"
        self.home.mkdir()
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="caf-", dir="/tmp"))  # short: Ray's unix sockets
        self.env = clean_env(self.home, RAY_TMPDIR=self.ray_tmp, **env)
        self.out, self.err = work / f"{name}.out", work / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.popen = subprocess.Popen(
                [CA_FLOW, *map(str, args)],
                stdout=out,
                stderr=err,
                env=self.env,
                cwd=work,
                start_new_session=True,
            )

    def ray_ports(self, needed: set) -> dict | None:
        """Ray's port files in this sweep's session ({gcs_server: ..., dashboard_agent_listen: ...}),
        once those `needed` are written."""
        found = {}
        for f in (self.ray_tmp / "ray" / "session_latest").glob("*_port_*"):
            text = f.read_text().strip()
            if text.lstrip("-").isdigit():
                found[f.name.split("_port_")[0]] = int(text)
        if self.popen.poll() is not None:
            pytest.fail(f"the sweep ended before its Ray could be probed:\n{self.stderr()[-3000:]}")
        return found if needed <= set(found) else None

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"sweep still running after {timeout:.0f} s:\n{self.stderr()[-3000:]}")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.popen.poll() is None:
                try:
                    os.killpg(self.popen.pid, sig)
                    self.popen.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Two real sweeps, started at once in their own processes, creating one fresh store: A (in an
    experiment named with quotes, a backslash and unicode) on clean data named `o'brien`,
    `back\\slash` and `ünï`; B on an `o'brien` whose train labels are wrong, plus a dataset short of
    --shots. Then a sweep whose weights cannot load offline.

    They run while the in-process tests do. (Their job API is probed by the namespace test below,
    where the agent's fixed port is surely free.)"""
    work = tmp_path_factory.mktemp("hardening")
    root_a, root_b = work / "data-a", work / "data-b"
    for name in QUOTED:
        coop_dataset(root_a / name)
    coop_dataset(root_b / "o'brien", train_shows=ROTATE)
    coop_dataset(root_b / "uneven", per_class={"blue": 2, "green": 5, "red": 2})
    (work / "store").mkdir()
    uri = f"sqlite:///{work / 'store' / 'mlflow.db'}"
    common = [
        *FAST,
        "--tracking-uri",
        uri,
        "--results-dir",
        work / "results",
        "--shots",
        "4",
        "--epochs",
        "30",
        "--lr",
        "0.5",
        "--alphas",
        "0.8",
        "--methods",
        "clip-adapter,zero-shot",
    ]
    sweeps = [
        Sweep(
            "a",
            [
                "sweep",
                "--datasets",
                ",".join(QUOTED),
                "--data-root",
                root_a,
                "--experiment",
                EXP_A,
                "--cache-dir",
                work / "cache-a",
                *common,
            ],
            work,
        ),
        Sweep(
            "b",
            [
                "sweep",
                "--datasets",
                "o'brien,uneven",
                "--data-root",
                root_b,
                "--allow-fewer-shots",
                "--experiment",
                EXP_B,
                "--cache-dir",
                work / "cache-b",
                *common,
            ],
            work,
        ),
    ]
    offline = None
    try:
        for sweep in sweeps:  # each sweep's Ray ports, as its session writes them
            sweep.ports = wait_for(
                "the sweep's Ray ports",
                lambda: sweep.ray_ports({"gcs_server", "dashboard_agent_listen", "runtime_env_agent"}),
                120,
            )
        (work / "offline").mkdir()
        offline = Sweep(
            "offline",
            [
                "sweep",
                "--datasets",
                "uneven",
                "--data-root",
                root_b,
                "--backbone",
                "RN50-quickgelu",
                "--pretrained",
                "openai",
                "--shots",
                "1",
                "--seeds",
                "1",
                "--methods",
                "zero-shot",
                "--cache-dir",
                work / "cache-offline",
                "--tracking-uri",
                f"sqlite:///{work / 'offline' / 'm.db'}",
            ],
            work,
            HF_HUB_OFFLINE="1",
        )  # offline at once, as on a machine without a network
        yield dict(work=work, uri=uri, sweeps=sweeps, offline=offline, root_a=root_a, root_b=root_b)
    finally:
        for s in (*sweeps, offline):
            if s is not None:
                s.stop()


def grpc_code(port: int, token: str | None):
    """The status of a real call to the GCS (its cluster id), with or without Ray's token."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            "/ray.rpc.NodeInfoGcsService/GetClusterId",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            call(b"", timeout=10, metadata=[("authorization", f"Bearer {token}")] if token else None)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


def http_code(url: str, token: str | None = None, body: dict | bytes | None = None) -> int:
    """The HTTP status of a GET (or, with a body, a POST), with or without Ray's token."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_a_local_sweep_keeps_rays_token_auth(launched):
    """No RAY_AUTH_MODE anywhere in ca-flow: the sweep's Ray makes a token, and its GCS and its runtime-env
    agent (on the LAN address) refuse a caller without it. Its job API: the test after this one."""
    import grpc
    from ray.util import get_node_ip_address

    assert not [p for p in REPO.glob("[wc]*/**/*.py") if "RAY_AUTH_MODE" in p.read_text()]
    for sweep in launched["sweeps"]:
        assert "RAY_AUTH_MODE" not in sweep.env
        ports = sweep.ports
        assert sweep.popen.poll() is None, "the sweep ended before its Ray could be probed"
        token = (sweep.home / ".ray" / "auth_token").read_text().strip()
        assert len(token) >= 32
        assert grpc_code(ports["gcs_server"], None) == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_code(ports["gcs_server"], "not-the-token") == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_code(ports["gcs_server"], token) == grpc.StatusCode.OK
        env_agent = f"http://{get_node_ip_address()}:{ports['runtime_env_agent']}/get_runtime_envs_info"
        assert http_code(env_agent, body=b"") == 401
        assert http_code(env_agent, "not-the-token", body=b"") == 403
        assert http_code(env_agent, token, body=b"") == 200


@pytest.mark.slow
def test_a_local_sweeps_job_api_refuses_a_caller_without_the_token(colour_root, tmp_path):
    """The agent's job API listens on a fixed port (52365) that another Ray on the machine often holds
    first: probed in a network namespace of its own, where the sweep's agent surely has it."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace of its own (unshare --net); CI runs as root")
    inner = f"ip link set lo up && exec {sys.executable} netns_job_api.py {tmp_path} {colour_root}"
    done = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", inner],
        cwd=REPO / "tests",
        capture_output=True,
        text=True,
        timeout=400,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == dict(port=52365, list_without=401, submit_without=401, list_wrong=403, list_with=404), (
        codes
    )


# -- while A and B run: in this process, on the session's Ray; and many processes at once ----------


def test_a_sweep_whose_every_trial_fails(ray_local, tmp_path):
    """Every train image undecodable: each trial fails for real. One line per failed trial (five, then
    how many more), exit 1, no traceback; report answers in one line."""
    coop_dataset(tmp_path / "data" / "dead", broken_train=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = invoke(
        [
            "sweep",
            "--datasets",
            "dead",
            "--data-root",
            tmp_path / "data",
            *FAST,
            "--seeds",
            "1,2,3",
            "--shots",
            "1,2",
            "--alphas",
            "0.2",
            "--epochs",
            "2",
            "--methods",
            "clip-adapter",
            "--cpus-per-trial",
            "0.5",
            "--tracking-uri",
            uri,
            "--cache-dir",
            tmp_path / "cache",
            "--results-dir",
            tmp_path / "results",
        ]
    )
    assert result.exit_code == 1, result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    (parent,), children = runs_of(uri, "ca-flow")
    sweep_id = parent.data.tags["ca_flow.sweep_id"]
    assert lines[0] == f"error: 6 of 6 trials failed; resume with: ca-flow resume {sweep_id}"
    assert len(lines) == 7 and lines[-1] == "  and 1 more", lines
    named = set()
    for line in lines[1:6]:  # each names its grid point truly: "  dead-clip-adapter-2shot-seed3 (key): ..."
        match = re.fullmatch(
            r"  dead-clip-adapter-(\d)shot-seed(\d) \([0-9a-f]{16}\): "
            r"dead: no readable train image for (\d) shots, seed (\d)",
            line,
        )
        assert match and match.group(1, 2) == match.group(3, 4), line
        named.add(match.group(1, 2))
    assert len(named) == 5
    assert "skipping unreadable image" in result.output
    assert len(children) == 6 and {c.info.status for c in children} == {"FAILED"}
    assert all("no readable train image" in c.data.tags["ca_flow.error"] for c in children)
    assert parent.info.status == "FAILED"
    report = invoke(["report", "--tracking-uri", uri, "--out", tmp_path / "report"])
    assert report.exit_code == 1
    assert report.stderr == (
        f"error: sweep {sweep_id} has no finished trial runs to report; see `ca-flow status {sweep_id}`\n"
    )
    status = json.loads(ok(["status", sweep_id, "--tracking-uri", uri, "--json"]).stdout)
    assert (status["status"], status["finished"], status["failed"]) == ("failed", 0, 6)


RACE = """
import multiprocessing as mp, sys, time
URI = sys.argv[1]

def create(start):
    from workflows import experiments, tracking
    while time.time() < start:
        pass
    client = tracking.connect(URI)  # a fresh store: each process would run the schema migration
    return experiments.experiment_id(client, "ca-flow", URI)

if __name__ == "__main__":
    import workflows.experiments, workflows.tracking, mlflow  # noqa: imported before the fork, so that all start at once
    start = time.time() + 3
    with mp.get_context("fork").Pool(6) as pool:
        print(sorted(set(pool.map(create, [start] * 6))))
"""


def test_many_processes_create_one_fresh_store_and_experiment_at_once(tmp_path):
    """The races behind 'two sweeps creating a fresh store at once', hit on purpose: six processes
    make the schema and the experiment at the same instant."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, "-c", RACE, uri],
        env=clean_env(tmp_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['1']", proc.stdout + proc.stderr[-3000:]


def test_the_embedded_store_commits_to_a_write_ahead_log(tmp_path):
    """A commit appends to the WAL instead of syncing the database file (about 10 ms each): the file
    says WAL to any process that opens it, and MLflow's own connections commit with synchronous
    NORMAL (1), not FULL (2)."""
    import sqlite3

    from workflows import tracking

    client = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("wal")
    with sqlite3.connect(tmp_path / "mlflow.db") as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with client._tracking_client.store.engine.connect() as mlflows_own:
        assert mlflows_own.exec_driver_sql("PRAGMA synchronous").scalar() == 1


# -- the store A and B made ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(launched):
    """The store A and B made, once both ended well."""
    for sweep in launched["sweeps"]:
        assert sweep.wait(420) == 0, sweep.stderr()[-3000:]
        assert "Traceback" not in sweep.stdout() + sweep.stderr()
    from mlflow import MlflowClient

    uri, done = launched["uri"], {}

    def promoted() -> dict:
        """`back\\slash` and `ünï` promoted from A (once): what promote said."""
        if not done:
            done.update(
                json.loads(
                    ok(
                        [
                            "promote",
                            "--experiment",
                            EXP_A,
                            "--datasets",
                            "back\\slash,ünï",
                            "--tracking-uri",
                            uri,
                            "--json",
                        ]
                    ).stdout
                )
            )
        return done

    a, b = launched["sweeps"]
    return dict(launched, client=MlflowClient(uri), a=a.stdout(), b=b.stdout(), promoted=promoted)


@pytest.mark.slow
def test_two_sweeps_create_one_fresh_store_at_once(store):
    for experiment, datasets in ((EXP_A, set(QUOTED)), (EXP_B, {"o'brien", "uneven"})):
        parents, children = runs_of(store["uri"], experiment)
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) == 2 * len(datasets) and {c.info.status for c in children} == {"FINISHED"}
        assert {c.data.params["dataset"] for c in children} == datasets
    assert "6 trials, 0 failed" in store["a"] and "4 trials, 0 failed" in store["b"]


def trial_runs(store, experiment: str, dataset: str | None = None, method: str | None = None) -> list:
    _, children = runs_of(store["uri"], experiment)
    return [
        r
        for r in children
        if (dataset is None or r.data.params["dataset"] == dataset)
        and (method is None or r.data.params["method"] == method)
    ]


def best(store, experiment: str, dataset: str, method: str):
    return max(trial_runs(store, experiment, dataset, method), key=lambda r: r.data.metrics["val_acc"])


@pytest.mark.slow
def test_quotes_backslashes_and_unicode_in_names(store):
    """Through sweep (above), sweeps, status, report, resume, promote and predict."""
    uri, client = store["uri"], store["client"]
    parents, children = runs_of(uri, EXP_A)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.params["dataset"] for r in children} == set(QUOTED)
    assert {r.data.tags["ca_flow.dataset"] for r in children} == set(QUOTED)
    sweep_id = parents[0].data.tags["ca_flow.sweep_id"]
    listed = json.loads(ok(["sweeps", "--tracking-uri", uri, "--experiment", EXP_A, "--json"]).stdout)
    assert [(s["sweep_id"], s["experiment"], s["status"]) for s in listed] == [(sweep_id, EXP_A, "finished")]
    status = json.loads(ok(["status", sweep_id, "--tracking-uri", uri, "--json"]).stdout)
    assert set(status["datasets"]) == set(QUOTED) and status["finished"] == len(children)
    for how in (["--experiment", EXP_A], ["--sweep", sweep_id]):
        report = json.loads(
            ok(["report", *how, "--tracking-uri", uri, "--out", store["work"] / "report", "--json"]).stdout
        )
        assert report["sweep_id"] == sweep_id and {r["dataset"] for r in report["rows"]} == set(QUOTED)
    text = ok(
        ["report", "--experiment", EXP_A, "--tracking-uri", uri, "--out", store["work"] / "report"]
    ).output
    assert all(name in text for name in QUOTED)
    again = invoke(["resume", sweep_id, "--tracking-uri", uri])
    assert again.exit_code == 1 and again.stderr.startswith(f"error: sweep {sweep_id} is finished")
    promoted = store["promoted"]()
    assert promoted["experiment"] == EXP_A
    assert {(p["dataset"], p["model"], p["action"]) for p in promoted["promotions"]} == {
        ("back\\slash", "clip-adapter-back\\slash", "new v1"),
        ("ünï", "clip-adapter-ünï", "new v1"),
    }
    for name in ("back\\slash", "ünï"):
        assert (
            client.get_model_version_by_alias(f"clip-adapter-{name}", "champion").run_id
            == best(store, EXP_A, name, "clip-adapter").info.run_id
        )
        image = store["root_a"] / name / "red" / "test_00.png"
        out = json.loads(
            ok(["predict", "--dataset", name, "--tracking-uri", uri, "--top-k", "3", "--json", image]).stdout
        )
        assert out["model"] == f"clip-adapter-{name}@champion"
        assert sorted(t["label"] for t in out["predictions"][0]["top"]) == sorted(COLOURS)


def action(store, *args) -> tuple[str, str, str]:
    """promote o'brien; (action, champion's run id, champion's method) as the registry says after it."""
    out = json.loads(
        ok(["promote", "--datasets", "o'brien", "--tracking-uri", store["uri"], "--json", *args]).stdout
    )
    (row,) = out["promotions"]
    alias = args[args.index("--alias") + 1] if "--alias" in args else "champion"
    champion = store["client"].get_model_version_by_alias("clip-adapter-o'brien", alias)
    return row["action"], champion.run_id, champion.tags["method"]


@pytest.mark.slow
def test_the_champion_moves_only_to_a_better_run(store):
    a_ca, b_ca = best(store, EXP_A, "o'brien", "clip-adapter"), best(store, EXP_B, "o'brien", "clip-adapter")
    b_zs = best(store, EXP_B, "o'brien", "zero-shot")
    a_zs = best(store, EXP_A, "o'brien", "zero-shot")
    va, vb, vz = (r.data.metrics["val_acc"] for r in (a_ca, b_ca, b_zs))
    # The data make these orders (A trained on true labels, B on rotated ones); the zero-shot runs of
    # A and B see the same val images.
    assert va > vz > vb, (va, vz, vb)
    assert a_zs.data.metrics["val_acc"] == vz
    a, b, aid, bid, zid = EXP_A, EXP_B, a_ca.info.run_id, b_ca.info.run_id, b_zs.info.run_id

    assert action(store, "--experiment", a) == ("new v1", aid, "clip-adapter")
    # The case: a later, worse sweep in another experiment does not demote the champion,
    # and its better zero-shot run is not even a candidate unless --methods names zero-shot.
    assert action(store, "--experiment", b) == (
        f"kept v1 (val_acc {va:.4f} >= {vb:.4f}; --force moves it)",
        aid,
        "clip-adapter",
    )
    assert action(store, "--experiment", b, "--methods", "clip-adapter,zero-shot") == (
        f"kept v1 (val_acc {va:.4f} >= {vz:.4f}; --force moves it)",
        aid,
        "clip-adapter",
    )
    # Under another alias, starting from B's weak run: a better zero-shot run stays out by default...
    assert action(store, "--experiment", b, "--alias", "trial") == ("new v2", bid, "clip-adapter")
    assert action(store, "--experiment", b, "--alias", "trial") == ("already v2", bid, "clip-adapter")
    # ...comes in when --methods names it, and a better run moves the alias on.
    assert action(store, "--experiment", b, "--alias", "trial", "--methods", "zero-shot") == (
        f"moved v2 -> v3 (val_acc {vb:.4f} -> {vz:.4f})",
        zid,
        "zero-shot",
    )
    assert action(store, "--experiment", a, "--alias", "trial") == (
        f"moved v3 -> v1 (val_acc {vz:.4f} -> {va:.4f})",
        aid,
        "clip-adapter",
    )
    # A tie keeps the champion: A's zero-shot run has exactly B's zero-shot val_acc.
    assert action(store, "--experiment", b, "--alias", "tie", "--methods", "zero-shot") == (
        "new v3",
        zid,
        "zero-shot",
    )
    assert action(store, "--experiment", a, "--alias", "tie", "--methods", "zero-shot") == (
        f"kept v3 (val_acc {vz:.4f} >= {vz:.4f}; --force moves it)",
        zid,
        "zero-shot",
    )
    # A dry run says what it would do and moves nothing; --force moves the alias to a worse run.
    dry = json.loads(
        ok(
            [
                "promote",
                "--datasets",
                "o'brien",
                "--experiment",
                b,
                "--force",
                "--dry-run",
                "--tracking-uri",
                store["uri"],
                "--json",
            ]
        ).stdout
    )
    assert dry["promotions"][0]["action"] == "would register, moving from v1"
    assert str(store["client"].get_model_version_by_alias("clip-adapter-o'brien", "champion").version) == "1"
    assert action(store, "--experiment", b, "--force") == (
        f"moved v1 -> v2 (val_acc {va:.4f} -> {vb:.4f}, forced)",
        bid,
        "clip-adapter",
    )
    versions = store["client"].search_model_versions('name = "clip-adapter-o\'brien"')
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]  # one version per run, reused
    printed = ok(
        ["promote", "--datasets", "o'brien", "--experiment", a, "--tracking-uri", store["uri"]]
    ).output
    assert f"moved v2 -> v1 (val_acc {vb:.4f} -> {va:.4f})" in " ".join(printed.split())


@pytest.mark.slow
def test_shots_a_class_cannot_give(store):
    refused = invoke(["sweep", "--datasets", "uneven", "--data-root", store["root_b"], *FAST, "--shots", "4"])
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        "error: uneven: class 'blue' has 2 train images, fewer than --shots 4; lower --shots, or pass "
        "--allow-fewer-shots to train on what there is (the real per-class counts are then logged)"
    )
    said = " ".join(store["b"].split())
    assert (
        "uneven: --allow-fewer-shots: 2 classes have fewer than 4 train images (fewest 2); runs log the "
        "real per-class counts"
    ) in said
    runs = trial_runs(store, EXP_B, "uneven")
    assert len(runs) == 2
    for run in runs:  # blue 2, green 5 (4 drawn), red 2: what the trial really trained on
        p = run.data.params
        assert (p["shots"], p["train_per_class_min"], p["train_per_class_max"], p["n_train"]) == (
            "4",
            "2",
            "4",
            "8",
        )
    for run in trial_runs(store, EXP_B, "o'brien"):
        p = run.data.params
        assert (p["train_per_class_min"], p["train_per_class_max"], p["n_train"]) == ("4", "4", "12")


@pytest.mark.slow
def test_registered_model_pins_what_it_needs_and_ships_its_code(store):
    from importlib.metadata import version

    import yaml

    import mlflow

    store["promoted"]()
    mlflow.set_tracking_uri(store["uri"])
    folder = Path(
        mlflow.artifacts.download_artifacts(
            "models:/clip-adapter-ünï@champion", dst_path=str(store["work"] / "model")
        )
    )
    lines = [line.strip() for line in (folder / "requirements.txt").read_text().splitlines() if line.strip()]
    pins = dict(line.split("==", 1) for line in lines)
    assert len(pins) == len(lines), f"unpinned requirement in {lines}"
    for package in ("torch", "torchvision", "open_clip_torch", "safetensors", "pillow", "numpy", "mlflow"):
        assert pins.get(package) == version(package), (package, pins)
    assert not [name for name in pins if name.replace("_", "-").lower() == "ca-flow"]
    conda = yaml.safe_load((folder / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert not [d for d in pip if d.split("==")[0].replace("_", "-").lower() == "ca-flow" or "==" not in d], (
        pip
    )
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["code"] == "code" and flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    shipped = folder / "code" / "clip_adapter"
    assert (shipped / "__init__.py").is_file() and (shipped / "adapter.py").is_file()
    assert (shipped / "ca-flow-tiny.json").is_file()  # the random tiny backbone rebuilds from it
    assert {p.name for p in (folder / "artifacts" / "adapter").iterdir()} == {
        "adapter.safetensors",
        "adapter.json",
    }
    assert not list(folder.rglob("*.pkl")) and "cloudpickle" not in (folder / "requirements.txt").read_text()


@pytest.mark.slow
def test_the_pyfunc_reads_paths_only_under_an_allow_listed_root(store, tmp_path):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    import mlflow

    store["promoted"]()
    mlflow.set_tracking_uri(store["uri"])
    root = store["root_a"] / "ünï"
    inside = str(root / "green" / "test_00.png")
    outside = tmp_path / "outside.png"
    shutil.copy(inside, outside)
    (root / "link.png").symlink_to(outside)
    uri = "models:/clip-adapter-ünï@champion"

    def refused(model, value, says, params=None):
        with pytest.raises(MlflowException) as info:
            model.predict(pd.DataFrame({"image": [value]}), params=params)
        assert info.value.error_code == "INVALID_PARAMETER_VALUE" and says in info.value.message, (
            info.value.message
        )
        assert len(info.value.message.splitlines()) == 1

    served = mlflow.pyfunc.load_model(uri)  # as `mlflow models serve` loads it: no root, no paths
    blob = base64.b64encode(Path(inside).read_bytes()).decode()
    assert len(served.predict(pd.DataFrame({"image": [blob]}), params={"top_k": 2})["top_labels"][0]) == 2
    refused(served, inside, "row 0: 'image' is not base64-encoded image bytes")
    refused(served, "/etc/passwd", "row 0: 'image' is not base64-encoded image bytes")
    refused(served, blob, "top_k must be an integer >= 1, got -5", {"top_k": -5})
    refused(
        served,
        base64.b64encode(png_header(20000, 20000)).decode(),
        "row 0: refused: Image size (400000000 pixels) exceeds limit",
    )
    local = mlflow.pyfunc.load_model(uri, model_config={"image_root": str(root)})
    assert local.predict(pd.DataFrame({"image": [inside]}))["label"][0] in COLOURS
    refused(local, "/etc/passwd", "row 0: /etc/passwd is outside the allowed image root")
    refused(local, str(root / ".." / "o'brien" / "red" / "test_00.png"), "is outside the allowed image root")
    refused(local, str(root / "link.png"), "is outside the allowed image root")


# -- the offline sweep, ended by now -----------------------------------------------------------------


@pytest.mark.slow
def test_weights_that_cannot_load_inside_a_ray_task_are_one_line(launched):
    """`--pretrained openai` offline: the BackboneError is raised in a Ray task and comes out as its
    own message, not Ray's traceback."""
    offline = launched["offline"]
    assert offline.wait(300) == 1, offline.stderr()[-3000:]
    err = offline.stderr()
    assert "Traceback" not in err + offline.stdout() and "RayTaskError" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err[-3000:]
    assert errors[0].startswith("error: cannot load 'openai' weights for RN50-quickgelu: ")
    assert errors[0].endswith("check the tag/file, or use --pretrained random for an offline demo")
    # Its parent run says so too, FAILED (not left RUNNING, which would read as an interrupted sweep).
    (parent,), children = runs_of(f"sqlite:///{launched['work'] / 'offline' / 'm.db'}", "ca-flow")
    assert parent.info.status == "FAILED" and not [c for c in children if c.info.status == "RUNNING"]
    assert parent.data.tags["ca_flow.error"].startswith("cannot load 'openai' weights for RN50-quickgelu: ")
