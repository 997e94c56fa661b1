"""Seconds per trial from outside: the whole `ca-flow sweep` command, warm feature store, a 4-trial grid
against an 80-trial one; with --profile, where the 80-trial sweep's CPU time goes, per process.

    python benchmarks/trial_overhead.py [--repeat 3] [--epochs 1] [--pack] [--profile]

Prints the wall seconds of each command (median and spread of --repeat runs) and the marginal
seconds per further trial, (t80 - t4) / 76. --cpu runs the 4-trial sweep once more and prints the
CPU seconds of every process it started, by kind: their sum over the cores bounds the wall time from
below, whatever the order of the steps. --profile runs the 80-trial sweep once more under py-spy
(--subprocesses: the driver, Ray's trial workers, the recorder) and prints, per process kind, its CPU
samples and the functions that hold the most of them (inclusive).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clip_adapter.backbone import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import procs  # noqa: E402  (its /proc readers)

CLI = [str(Path(sys.executable).parent / "ca-flow")]  # the installed command; PYTHONPATH picks this checkout
SMALL = ["--shots", "1", "--seeds", "1"]  # 1 x 1 x 4 alphas = 4 trials
LARGE = ["--shots", "1,2,4,8", "--seeds", "1,2,3,4,5"]  # 4 x 5 x 4 alphas = 80 trials
# What a function's samples say: the parts of ca-flow and its stack whose names tell the story.
KINDS = (("recorder", "recorder.py"), ("trial worker", "run_trial"), ("driver", "workflows/cli.py"))


def sweep_args(work: Path, grid: list[str], args) -> list[str]:
    return [
        "sweep",
        "--datasets",
        "textile",
        "--backbone",
        TINY,
        "--pretrained",
        "random",
        "--methods",
        "clip-adapter",
        "--alphas",
        "0.2,0.4,0.6,0.8",
        "--epochs",
        str(args.epochs),
        "--cache-dir",
        str(work / "cache"),
        "--results-dir",
        str(work / "results"),
        "--storage-path",
        str(work / "ray_results"),
        "--tracking-uri",
        f"sqlite:///{work / 'mlflow.db'}",
        *grid,
        *(["--pack"] if args.pack else []),
    ]


def sweep(work: Path, grid: list[str], args, env, prefix: list[str] = ()) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [*prefix, *CLI, *sweep_args(work, grid, args)], env=env, cwd=work, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"sweep failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def profile(work: Path, args, env) -> None:
    raw = work / "profile.txt"
    spy = [
        shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
        "record",
        "--subprocesses",
        "--format",
        "raw",
        "-r",
        "100",
        "-o",
        str(raw),
        "--",
    ]
    sweep(work, LARGE, args, env, spy)
    per_kind, funcs = collections.Counter(), collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        kind = next((k for k, needle in KINDS if needle in stack), "other (Ray, Tune's driver loop, imports)")
        per_kind[kind] += n
        for name in {re.sub(r"\s*\(.*?([^/]+/[^/]+\.py).*\)", r" (\1)", f) for f in frames[1:]}:
            funcs[kind][name] += n
    total = sum(per_kind.values())
    print(f"py-spy, {total} CPU samples at 100 Hz over the 80-trial sweep (all processes)")
    for kind, n in per_kind.most_common():
        print(f"  {kind}: {n} samples ({n / total:.0%})")
        for name, m in funcs[kind].most_common(args.top):
            print(f"      {m:6d} {m / total:6.1%}  {name[:110]}")


def cpu_by_process(work: Path, args, env) -> None:
    """The 4-trial sweep once, every process it starts polled in /proc (utime + stime, 10 times a second,
    the last reading kept): CPU seconds per kind of process."""
    ticks = os.sysconf("SC_CLK_TCK")

    def kind(pid: str) -> str:
        """Ray's workers by their title (ray::Recorder), Python by its script, the rest by executable."""
        words = procs.cmdline(int(pid)).split()
        if not words:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        if words[0].startswith("ray::") or not Path(words[0]).name.startswith("python"):
            return Path(words[0]).name
        return Path(next((w for w in words[1:] if not w.startswith("-")), words[0])).name

    def readings() -> dict:
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = procs.stat_fields(int(pid))  # state, ppid, ...: utime 11, stime 12, start 19
                if fields:
                    found[(pid, fields[19])] = (kind(pid), (int(fields[11]) + int(fields[12])) / ticks)
            except OSError:  # ended while read
                continue
        return found

    before, seen = set(readings()), {}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*CLI, *sweep_args(work, SMALL, args)],
        env=env,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None:
        seen.update(readings())
        time.sleep(0.1)
    wall = time.perf_counter() - started
    seen.update(readings())  # Ray's processes outlive the driver by a moment
    per_kind, count = collections.Counter(), collections.Counter()
    for key, (what, cpu) in seen.items():
        if key not in before:
            per_kind[what] += cpu
            count[what] += 1
    total, cores = sum(per_kind.values()), os.cpu_count()
    print(
        f"CPU seconds of the 4-trial sweep, by process ({wall:.1f} s wall; {total:.1f} CPU-s, so at least "
        f"{total / cores:.1f} s on {cores} cores):"
    )
    for what, cpu in per_kind.most_common():
        if cpu >= 0.05:
            print(f"  {cpu:6.2f}  {count[what]} x {what}")


def recorder_ops(work: Path, n: int = 40) -> None:
    """The recorder's writes for n trials, in this process, each MLflow call timed: what one trial costs
    the sweep's single writer."""
    import numpy as np
    import torch

    from clip_adapter.methods import make
    from workflows import tracking
    from workflows.point import TrialPoint
    from workflows.recorder import Recorder

    uri = f"sqlite:///{work / 'recorder.db'}"
    client = tracking.connect(uri)  # as the driver does before the recorder starts
    exp_id = client.create_experiment("ops")
    parent = client.create_run(exp_id).info.run_id
    rec = Recorder(uri, exp_id, parent, "bench")
    clock = collections.Counter()
    for name in ("create_run", "log_artifacts", "log_inputs", "log_batch", "set_terminated"):

        def timed(*a, _f=getattr(client, name), _n=name, **k):
            t0 = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                clock[_n] += time.perf_counter() - t0

        setattr(client, name, timed)
    rec.client = client
    from clip_adapter.artifact import AdapterMeta, adapter_files

    text = np.eye(10, 64, dtype=np.float32)
    method = make("clip-adapter", text, 20.0, epochs=1)
    files = adapter_files(
        method,
        torch.from_numpy(text),
        AdapterMeta(
            method="clip-adapter",
            config=method.config(),
            backbone=TINY,
            weights="random",
            weights_id="x",
            classnames=[str(i) for i in range(10)],
            template="a photo of a {}.",
            logit_scale=20.0,
            dataset="d",
        ),
    )
    params = {f"p{i}": i for i in range(24)}
    metrics = dict(val_acc=0.5, test_acc=0.5, zs_test_acc=0.3, train_loss_final=1.0, trial_seconds=0.1)
    source = dict(name="d", digest="0" * 8, source_type="local", source="file:///d")
    started = time.perf_counter()
    for i in range(n):
        point = TrialPoint.keyed(dataset="d", method="clip-adapter", shots=1, seed=i, weights="random")
        rec.start(point, int(time.time() * 1000))
        rec.finish(point.key, params, metrics, [1.0] * 50, files, source, int(time.time() * 1000))
    rec.drain()  # the writes happen on the recorder's writer thread
    total = time.perf_counter() - started
    assert not rec.unwritten, rec.unwritten
    print(
        f"recorder, {n} trials written in this process (sqlite): {total / n:.3f} s per trial; by MLflow call:"
    )
    for name, secs in clock.most_common():
        print(f"  {name:15} {secs / n:.3f} s per trial")
    print(f"  {'(rest)':15} {(total - sum(clock.values())) / n:.3f} s per trial")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--pack", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="CPU seconds per process of the 4-trial sweep")
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--recorder-only", action="store_true", help="only time the recorder's MLflow writes")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ca-flow-overhead-"))
    if args.profile or args.recorder_only:
        recorder_ops(work)
    if args.recorder_only:
        return
    env = dict(
        os.environ,
        HOME=str(work / "home"),
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    sweep(work, SMALL, args, env)  # encodes the features: every timed sweep below finds them stored
    small, large = [], []
    for _ in range(args.repeat):
        small.append(sweep(work, SMALL, args, env))
        large.append(sweep(work, LARGE, args, env))
    s4, s80 = statistics.median(small), statistics.median(large)
    print(
        f"whole `ca-flow sweep`, warm feature store, textile {TINY} random, --epochs {args.epochs}"
        f"{' --pack' if args.pack else ''}, {os.cpu_count()} CPUs, median of {args.repeat} (min-max):"
    )
    print(f"   4 trials: {s4:6.2f} s ({min(small):.2f}-{max(small):.2f})")
    print(f"  80 trials: {s80:6.2f} s ({min(large):.2f}-{max(large):.2f})")
    print(
        f"  each further trial: {(s80 - s4) / 76:.3f} s "
        f"({(min(large) - max(small)) / 76:.3f}-{(max(large) - min(small)) / 76:.3f})"
    )
    if args.profile:
        profile(work, args, env)
    if args.cpu:
        cpu_by_process(work, args, env)


if __name__ == "__main__":
    main()
