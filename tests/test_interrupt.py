"""Ctrl-C or SIGTERM while the features are being encoded (the first hour of a paper sweep), before
any trial ran: one line, the resume hint, exit 128 + signal, and `resume` finishes the sweep.

The signal lands while the encoding pipeline holds a crop task at a barrier the test controls."""

from __future__ import annotations

import signal

import pytest
from procs import TINY_SWEEP, assert_sweep_complete, ca_flow, clean_env, last_line, run_cli, wait_for

from workflows.barrier import VARIABLE

pytestmark = pytest.mark.slow
GRID = [
    "--datasets",
    "colours",
    "--methods",
    "clip-adapter",
    "--alphas",
    "0.2,0.6",
    "--shots",
    "1",
    "--seeds",
    "1",
    "--epochs",
    "2",
    "--augment-views",
    "2",
    "--experiment",
    "interrupt",
]
NOISE = ("Traceback", "Ray Data", "internal code", "SystemError", "github.com/ray-project")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_encoding_is_one_line_and_resume_finishes(sig, colour_root, tmp_path):
    barrier = tmp_path / "barrier"
    (barrier / "encode").mkdir(parents=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "sweep",
        *GRID,
        *TINY_SWEEP,
        "--data-root",
        str(colour_root),
        "--tracking-uri",
        uri,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--results-dir",
        str(tmp_path / "results"),
        "--storage-path",
        str(tmp_path / "ray_results"),
    ]
    home = tmp_path / "home"
    home.mkdir()
    sweep = ca_flow(args, tmp_path / "sweep.log", clean_env(home, **{VARIABLE: barrier}), tmp_path)
    try:
        wait_for(
            "a crop task at the barrier", lambda: any((barrier / "encode").glob("*.started")), 180, [sweep]
        )
        sweep.signal(sig)
        wait_for("the sweep to say it is stopping", lambda: "stopping once" in sweep.output(), 30, [sweep])
        (barrier / "encode" / "release").touch()
        rc = sweep.wait(120)
    finally:
        sweep.stop()
    out = sweep.output()
    assert rc == 128 + sig, out
    line = last_line(out)
    assert line.startswith("interrupted: 0 of 2 trials done; resume with: ca-flow resume "), out
    assert not [word for word in NOISE if word in out], out
    if sig == signal.SIGTERM:
        return  # the same path from here on
    resumed = run_cli(
        ["resume", line.rsplit(" ", 1)[1], "--tracking-uri", uri, "--experiment", "interrupt"],
        clean_env(home),
        tmp_path,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_sweep_complete(uri, "interrupt", 2)
