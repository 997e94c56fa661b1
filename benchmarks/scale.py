"""How the data plane scales: a generated JPEG folder at two sizes, cold and warm, path and file:// URI.

    python benchmarks/scale.py [--sizes 2000,20000] [--before /path/to/older/checkout]

For each size it runs `ca-flow sweep` (one trial: the encode is what is measured) as a subprocess and
prints, side by side: the image bytes the sweep reads, peak driver RSS (sampled from /proc), peak Ray
object-store use (sampled from the raylet), encode throughput, cold and warm wall time and time to the
first trial's run, and the same with the data root given as a file:// URI. It also times a plain
in-process loop of the same read + decode + crop + forward, the bound the Ray Data pipeline is held to.
With --before, the same sweeps run with an older checkout's code (PYTHONPATH) for a before/after table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
GRID = [
    "--backbone",
    "ca-flow-tiny",
    "--pretrained",
    "random",
    "--methods",
    "clip-adapter",
    "--shots",
    "1",
    "--seeds",
    "1",
    "--alphas",
    "0.2",
    "--epochs",
    "1",
    "--augment-views",
    "1",
]


def make_images(root: Path, n: int, classes: int = 10, size: int = 256) -> Path:
    """n noise JPEGs (about 60 KB each: noise does not compress) in `classes` folders; made once per size."""
    folder = root / f"noise{n}"
    if (folder / ".done").exists():
        return folder
    rng = np.random.default_rng(n)
    for i in range(n):
        d = folder / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / f"img{i:06d}.jpg", quality=90)
    (folder / ".done").write_text("")
    return folder


def read_bytes_planned(data_root: Path, name: str) -> int:
    """Bytes of the images a one-trial sweep encodes: its few-shot train/val images and the test split."""
    sys.path.insert(0, str(REPO))
    from clip_adapter import datasets
    from clip_adapter.datasets import few_shot

    split = datasets.load(datasets.resolve(name, data_root)[0])
    train, val = few_shot(split, 1, 1)
    return sum(os.path.getsize(i.path) for i in train + val + split.test)


class Sampler(threading.Thread):
    """Peak RSS of a process (from /proc) and peak plasma use of a Ray cluster, sampled while it runs."""

    def __init__(self, pid: int, address: str | None):
        super().__init__(daemon=True)
        self.pid, self.address, self.rss, self.plasma, self.stop = pid, address, 0, 0, threading.Event()

    def run(self):
        while not self.stop.wait(0.1):
            try:
                rss = (
                    int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{self.pid}/status").read_text()).group(1))
                    * 1024
                )
                self.rss = max(self.rss, rss)
            except (OSError, AttributeError):
                pass


def plasma_peak(address: str, stop: threading.Event, out: dict):
    """Object-store bytes in use, polled through the raylet (`ray memory --stats-only`)."""
    import ray
    from ray._private.internal_api import memory_summary

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    while not stop.wait(0.5):
        try:
            text = memory_summary(address=address, stats_only=True)
            m = re.search(r"Plasma memory usage (\d+) MiB", text)
            if m:
                out["plasma"] = max(out.get("plasma", 0), int(m.group(1)))
        except Exception:
            pass
    ray.shutdown()


def sweep(data_root: str, name: str, work: Path, env: dict, address: str, code: Path) -> dict:
    """One `ca-flow sweep` subprocess: wall time, peak RSS, encode line, first trial's start."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cmd = [
        sys.executable,
        "-m",
        "workflows.cli",
        "sweep",
        "--datasets",
        name,
        "--data-root",
        data_root,
        *GRID,
        "--cache-dir",
        str(work / "cache"),
        "--results-dir",
        str(work / "results"),
        "--tracking-uri",
        uri,
        "--storage-path",
        str(work / "ray_results"),
        "--experiment",
        "scale",
        "--address",
        address,
    ]
    started = time.time()
    proc = subprocess.Popen(
        cmd,
        cwd=work,
        env=dict(env, PYTHONPATH=str(code)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sampler = Sampler(proc.pid, address)
    sampler.start()
    out = proc.communicate()[0]
    wall = time.time() - started
    sampler.stop.set()
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({proc.returncode}):\n{out[-3000:]}")
    encoded = re.search(r"features\s+\S+: (\d+) images encoded.*\(([\d.]+) s\)", out)
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("scale")
    runs = client.search_runs(
        [exp.experiment_id],
        "tags.`mlflow.parentRunId` != ''",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    first = runs[0].info.start_time / 1000 - started if runs else float("nan")
    return dict(
        wall=wall,
        rss=sampler.rss,
        encoded=int(encoded.group(1)) if encoded else -1,
        encode_s=float(encoded.group(2)) if encoded else float("nan"),
        first_trial=first,
    )


def plain_loop(data_root: Path, name: str) -> float:
    """Images/s of read + decode + crop + forward in this process, 2 torch threads: the bound."""
    sys.path.insert(0, str(REPO))
    import torch

    from clip_adapter import datasets
    from clip_adapter.backbone import load_backbone
    from clip_adapter.datasets import few_shot
    from clip_adapter.encoding import encode_in_process
    from clip_adapter.features import Request

    torch.set_num_threads(2)
    split = datasets.load(datasets.resolve(name, data_root)[0])
    train, val = few_shot(split, 1, 1)
    items = (train + val + split.test)[:2000]
    reqs = [Request(name, i.path, "", 0, 0, [0], False) for i in items]
    backbone = load_backbone("ca-flow-tiny", "random", "cpu")
    start = time.perf_counter()
    n = sum(1 for _ in encode_in_process(backbone, reqs))
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--work", default=None, help="where the images and stores go (default: a temp dir)")
    ap.add_argument("--before", default=None, help="an older checkout to run the same sweeps with")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ca-flow-scale-"))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    # Token auth, as a user's cluster has it (cluster/README.md): the heads, the sweeps and the sampler
    # in this process share the token in ~/.ray/auth_token.
    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"] = "token"
    versions = [("after", REPO)] + ([("before", Path(args.before).resolve())] if args.before else [])
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        folder = make_images(work / "data", n)
        name = folder.name
        mb = read_bytes_planned(work / "data", name) / 2**20
        loop = plain_loop(work / "data", name)
        for version, code in versions:
            for root_form in ["path", "file://"] if version == "after" else ["path"]:
                data_root = str(work / "data") if root_form == "path" else f"file://{work / 'data'}"
                run_dir = work / f"run-{n}-{version}-{root_form.strip(':/')}"
                shutil.rmtree(run_dir, ignore_errors=True)  # cold means cold: no store left from a past run
                run_dir.mkdir()
                stats = {}
                head = _head(run_dir, dict(env, PYTHONPATH=str(code)))  # its workers run that code too
                try:
                    stop = threading.Event()
                    t = threading.Thread(target=plasma_peak, args=(head["address"], stop, stats), daemon=True)
                    t.start()
                    cold = sweep(data_root, name, run_dir, env, head["address"], code)
                    warm = sweep(data_root, name, run_dir, env, head["address"], code)
                    stop.set()
                    t.join(10)
                finally:
                    _stop_head(head)
                rows.append(
                    dict(
                        images=n,
                        version=version,
                        root=root_form,
                        read_mb=mb,
                        rss_mib=cold["rss"] / 2**20,
                        plasma_mib=stats.get("plasma", float("nan")),
                        encode_ips=cold["encoded"] / cold["encode_s"]
                        if cold["encoded"] > 0
                        else float("nan"),
                        loop_ips=loop,
                        cold_s=cold["wall"],
                        warm_s=warm["wall"],
                        cold_first=cold["first_trial"],
                        warm_first=warm["first_trial"],
                        warm_encoded=warm["encoded"],
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        f"{'images':>7} {'version':>7} {'root':>8} {'read MB':>8} {'peak RSS MiB':>12} {'plasma MiB':>10} "
        f"{'encode img/s':>12} {'loop img/s':>10} {'vs loop':>7} {'cold s':>7} {'warm s':>7} "
        f"{'1st trial cold':>14} {'1st trial warm':>14} {'warm encoded':>12}"
    )
    for r in rows:
        print(
            f"{r['images']:>7} {r['version']:>7} {r['root']:>8} {r['read_mb']:>8.0f} {r['rss_mib']:>12.0f} "
            f"{r['plasma_mib']:>10.0f} {r['encode_ips']:>12.0f} {r['loop_ips']:>10.0f} "
            f"{r['encode_ips'] / r['loop_ips']:>7.2f} {r['cold_s']:>7.1f} {r['warm_s']:>7.1f} "
            f"{r['cold_first']:>14.1f} {r['warm_first']:>14.1f} {r['warm_encoded']:>12}"
        )
    for version in dict(versions):
        for root in ("path", "file://"):
            mine = sorted(
                (r for r in rows if r["version"] == version and r["root"] == root), key=lambda r: r["images"]
            )
            if len(mine) >= 2:
                a, b = mine[0], mine[-1]
                per_gb = (b["rss_mib"] - a["rss_mib"]) / ((b["read_mb"] - a["read_mb"]) / 1024)
                print(
                    f"{version} ({root}): peak driver RSS grows {per_gb:.0f} MiB per GB of images read "
                    f"({a['images']} -> {b['images']} images)"
                )


def _head(run_dir: Path, env: dict) -> dict:
    """A 2-CPU local head of its own (its own temp dir and ports), so the sampler can watch its store."""
    sys.path.insert(0, str(REPO / "tests"))
    from procs import Proc, free_port, port_open

    tmp = Path(tempfile.mkdtemp(prefix="caf-s-", dir="/tmp"))
    gcs = free_port()
    proc = Proc(
        "ray head",
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={tmp}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
        ],
        run_dir / "head.log",
        env,
        run_dir,
    )
    deadline = time.monotonic() + 60
    while not port_open(gcs) and time.monotonic() < deadline:
        time.sleep(0.25)
    time.sleep(2)
    return dict(address=f"127.0.0.1:{gcs}", proc=proc, tmp=tmp)


def _stop_head(head: dict) -> None:
    head["proc"].stop(leader_only=True)
    shutil.rmtree(head["tmp"], ignore_errors=True)


if __name__ == "__main__":
    main()
