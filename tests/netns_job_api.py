"""Run inside a network namespace of its own (see test_hardening.py): start a local `ca-flow sweep`,
hold it at the encoding barrier, and probe its dashboard agent's job API on the agent's fixed port,
which in this namespace nobody else holds. Prints one JSON document of HTTP status codes.

    unshare --net -- sh -c 'ip link set lo up && exec python netns_job_api.py WORK DATA_ROOT'
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from procs import CA_FLOW, TINY_SWEEP, clean_env

AGENT_PORT = 52365  # Ray's default for the dashboard agent: the port other Rays on a machine take first


def http_code(url: str, token: str | None = None, body: dict | None = None) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def agent_port(session: Path) -> int | None:
    found = session / "dashboard_agent_listen_port_port_file"
    for f in session.glob("dashboard_agent_listen_port*"):
        found = f
    text = found.read_text().strip() if found.exists() else ""
    return int(text) if text.lstrip("-").isdigit() else None


def main(work: Path, data_root: str) -> dict:
    home, barrier, ray_tmp = work / "home", work / "barrier", Path("/tmp") / f"caf-ns-{os.getpid()}"
    for d in (home, barrier / "encode", ray_tmp):
        d.mkdir(parents=True, exist_ok=True)
    env = clean_env(home, RAY_TMPDIR=ray_tmp, CA_FLOW_TEST_BARRIER=barrier)
    args = [
        "sweep",
        "--datasets",
        "colours",
        "--data-root",
        data_root,
        *TINY_SWEEP,
        "--shots",
        "1",
        "--seeds",
        "1",
        "--methods",
        "zero-shot",
        "--tracking-uri",
        f"sqlite:///{work / 'mlflow.db'}",
        "--cache-dir",
        str(work / "cache"),
        "--results-dir",
        str(work / "results"),
    ]
    with open(work / "sweep.log", "wb") as log:
        sweep = subprocess.Popen(
            [CA_FLOW, *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while not any((barrier / "encode").glob("*.started")):  # Ray is up, its agents too
            if sweep.poll() is not None or time.monotonic() > deadline:
                return dict(
                    error="the sweep did not reach the barrier", log=(work / "sweep.log").read_text()[-3000:]
                )
            time.sleep(0.2)
        port = agent_port(ray_tmp / "ray" / "session_latest")
        token = (home / ".ray" / "auth_token").read_text().strip()
        url = f"http://127.0.0.1:{AGENT_PORT}"
        return dict(
            port=port,
            list_without=http_code(f"{url}/api/jobs/"),
            submit_without=http_code(f"{url}/api/job_agent/jobs/", body={"entrypoint": "true"}),
            list_wrong=http_code(f"{url}/api/jobs/", "not-the-token"),
            list_with=http_code(f"{url}/api/jobs/", token),
        )
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(sweep.pid, sig)
                sweep.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])))
