"""The MLflow UI in a real browser (headless Chromium), as a newcomer meets it: an empty store, one
sweep, then the link the sweep printed, opened on `ca-flow ui` (a local store) or on a tracking server.

What a page shows is its text once Chromium has run its scripts. Needs chromium: skipped without it,
except under CI=true, where missing it is a failure (.ci/run installs it).
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from procs import (
    ca_flow,
    clean_env,
    free_port,
    healthy,
    last_line,
    mlflow_server,
    pids_matching,
    run_cli,
    tail,
    wait_for,
)

from clip_adapter.backbone import TINY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CLIP-Adapter at two alphas and zero-shot: three trial runs under one parent.
SWEEP = [
    "sweep",
    "--backbone",
    TINY,
    "--pretrained",
    "random",
    "--datasets",
    "textile",
    "--shots",
    "1",
    "--seeds",
    "1",
    "--alphas",
    "0.2,0.6",
    "--augment-views",
    "2",
    "--epochs",
    "3",
    "--experiment",
    "first",
]
TRIALS = 3
LINK = re.compile(r"^runs: (\S+)", re.M)
VIEW_PATH = re.compile(r"^http://127\.0\.0\.1:\d+(/#/experiments/\d+/runs\?viewStateShareKey=ca-flow)$")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def chromium():
    if CHROMIUM:
        return CHROMIUM
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("chromium is missing under CI=true: .ci/run installs it (apt-get install -y chromium)")
    pytest.skip("chromium is not installed: apt-get install -y chromium")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("newcomer")
    return dict(work=work, env=clean_env(work / "home"), cache=str(work / "cache"))


def render(url: str, profile: Path, budget_ms: int = 20000) -> str:
    """The page as headless Chromium leaves it once its scripts are done: visible text, tags removed."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=2400,1400",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0 and done.stdout, f"chromium exited {done.returncode}:\n{done.stderr[-2000:]}"
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", done.stdout, flags=re.S)
    return html.unescape(" ".join(re.sub(r"<[^>]+>", " ", dom).split()))


def render_until(url: str, profile: Path, *needles: str) -> str:
    text = ""
    for budget in (20000, 40000):  # a slow first start (fonts, caches): once more with more time
        text = render(url, profile, budget)
        if all(n in text for n in needles):
            break
    return text


def sweep_once(work: dict, *extra: str) -> tuple[str, str]:
    """One sweep by the real CLI in `work`; (the runs link it printed, its whole stdout)."""
    done = run_cli(SWEEP + ["--cache-dir", work["cache"], *extra], work["env"], work["work"], timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # A successful sweep says nothing that reads as an error (Ray's C++ log lines carry " E " or " W ").
    noise = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if re.search(r"\berror\b|warning|traceback|^\[[^]]* [EW] \d+ \d+\]", line, re.I)
    ]
    assert not noise, noise
    links = LINK.findall(done.stdout)
    assert len(links) == 1, done.stdout
    return links[0], done.stdout


def trial_runs(uri: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("first")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def assert_shows_the_sweep(text: str, runs: list) -> None:
    """ca-flow's view: every trial run by name, grouped by dataset and method, the accuracy columns."""
    assert "does not exist" not in text and "Error loading shared view" not in text, text[:3000]
    missing = [r.info.run_name for r in runs if r.info.run_name not in text]
    assert not missing, (missing, text[:3000])
    for column in ("Metrics", "Parameters", "val_acc", "test_acc", "zs_test_acc", "shots", "seed", "alpha"):
        assert column in text, (column, text[:3000])
    assert "dataset: textile" in text and "method: clip-adapter" in text and "method: zero-shot" in text, (
        text[:3000]
    )
    digest = runs[0].inputs.dataset_inputs[0].dataset.digest
    assert f"textile ({digest})" in text, text[:3000]


def start_ui(work: dict, log_dir: Path, *args: str):
    """`ca-flow ui` as a user runs it, on a free port (another if the one picked was taken meanwhile);
    (its Proc, the link it printed)."""
    for attempt in range(3):
        port = free_port()
        proc = ca_flow(
            ["ui", "--port", str(port), *args], log_dir / f"ui-{attempt}.log", work["env"], work["work"]
        )
        printed = wait_for(
            "ca-flow ui's link", lambda: "Ctrl-C stops it." in proc.output() or not proc.alive(), 240
        )
        assert printed
        if proc.alive():
            return proc, LINK.findall(proc.output())[0]
        assert f"port {port} on 127.0.0.1 is in use" in proc.output(), proc.output()
    pytest.fail("no free port for ca-flow ui in 3 tries")


def test_first_sweep_prints_a_link_that_ca_flow_ui_opens_on_the_runs(work, tmp_path):
    link, stdout = sweep_once(work)
    # The store did not exist before this sweep: the link must work all the same.
    path = VIEW_PATH.match(link)
    assert path and link.startswith("http://127.0.0.1:5000/"), link
    assert "(open it: ca-flow ui)" in stdout, stdout[-2000:]
    runs = trial_runs(f"sqlite:///{work['work'] / 'mlflow.db'}")
    assert len(runs) == TRIALS

    proc, printed = start_ui(work, tmp_path)
    port = int(printed.split(":")[2].split("/")[0])
    try:
        # The same page, on the port this UI listens on.
        assert VIEW_PATH.match(printed) and VIEW_PATH.match(printed).group(1) == path.group(1), (
            printed,
            link,
        )
        text = render_until(printed, tmp_path / "p1", *(r.info.run_name for r in runs))
        assert_shows_the_sweep(text, runs)
        # Without the link the UI opens the same experiment on its training runs (one parent row, folded).
        base = printed.split("/#/")[0]
        exp_id = runs[0].info.experiment_id
        text = render_until(f"{base}/#/experiments/{exp_id}/runs", tmp_path / "p2", "Training runs")
        assert "Training runs" in text and f"{TRIALS + 1} matching runs" in text, text[:3000]

        # Ctrl-C (to ca-flow, the terminal's foreground process) stops the UI and everything it started.
        proc.signal(signal.SIGINT)
        assert proc.wait(30) == 0, tail(proc.log)
        assert last_line(proc.output()) == "MLflow UI stopped.", proc.output()
        left = {**pids_matching(".", proc.pid), **pids_matching(rf"mlflow ui .*--port {port}( |$)")}
        assert not left and not healthy(base), f"left running after Ctrl-C: {left}"
    finally:
        proc.stop()
        for pid in pids_matching(rf"mlflow ui .*--port {port}( |$)"):  # what this test's UI left, if any
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # it leads its own group, uvicorn in it


def test_sweep_to_a_tracking_server_prints_a_link_that_opens_its_runs(work, tmp_path):
    logs = tmp_path / "server"
    logs.mkdir()
    with mlflow_server(tmp_path / "server.db", tmp_path / "artifacts", logs, work["env"], logs) as (url, _):
        link, _ = sweep_once(work, "--tracking-uri", url)  # a new experiment, made through the server
        assert link.startswith(f"{url}/#/experiments/") and link.endswith(
            "/runs?viewStateShareKey=ca-flow"
        ), link
        runs = trial_runs(url)
        assert len(runs) == TRIALS
        text = render_until(link, tmp_path / "p", *(r.info.run_name for r in runs))
        assert_shows_the_sweep(text, runs)
        # A server has its own UI: `ca-flow ui` prints its link and returns.
        done = run_cli(["ui", "--tracking-uri", url], work["env"], work["work"], timeout=120)
        assert done.returncode == 0 and last_line(done.stdout) == f"runs: {link}", done.stdout + done.stderr
