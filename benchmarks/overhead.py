"""Seconds per trial that Ray Tune + MLflow add: the same trials in a plain loop vs `ca-flow sweep`.

    python benchmarks/overhead.py [--epochs N] [--shots 1,2,4,8] [--seeds 1,2,3] [--alphas ...]

Prints, side by side from one run: the plain loop (fit + evaluate on the same features, no Ray, no
MLflow), the sweep with one trial at a time (--cpus-per-trial 2), and the sweep with two at once
(--cpus-per-trial 1), each with its per-trial overhead and ratio to the loop, and where the time
outside training goes (MLflow logging inside trials, Ray Tune outside them).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from clip_adapter import datasets  # noqa: E402
from clip_adapter.backbone import TINY  # noqa: E402
from clip_adapter.features import FeatureStore  # noqa: E402
from workflows import sweep, tracking  # noqa: E402
from workflows.encode import dataset_features  # noqa: E402
from workflows.grid import SweepSpec, grid  # noqa: E402
from workflows.run_search import children  # noqa: E402
from workflows.trial import train_trial  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=None, help="default: CoOp's by shots")
    ap.add_argument("--shots", default="1,2,4,8")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--alphas", default="0.2,0.4,0.6,0.8")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ca-flow-bench-"))
    spec = SweepSpec(
        datasets="textile",
        backbone=TINY,
        pretrained="random",
        epochs=args.epochs,
        shots=[int(x) for x in args.shots.split(",")],
        seeds=[int(x) for x in args.seeds.split(",")],
        alphas=[float(x) for x in args.alphas.split(",")],
        cache_dir=str(work / "cache"),
        results_dir=str(work / "results"),
        storage_path=str(work / "ray_results"),
    ).validate()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    split = datasets.load(datasets.resolve("textile", spec.data_root)[0])
    store = FeatureStore(spec.cache_dir, spec.backbone, spec.pretrained)
    data = dataset_features([split], spec, store, 0.0, 1, 1, lambda p, r: None)["textile"]
    trials = grid(spec, ["textile"])

    torch.set_num_threads(1)  # what each trial gets in the sweep
    train_trial(trials[0], data)  # untimed: the loop is timed warm, so one-off start-up counts as overhead
    started = time.perf_counter()
    for point in trials:
        train_trial(point, data)
    loop = time.perf_counter() - started

    quiet = Console(file=open(os.devnull, "w"))
    rows = [("plain loop (1 at a time)", loop, loop, 1)]
    for cpus, label in ((2.0, "ca-flow sweep, 1 at a time"), (1.0, "ca-flow sweep, 2 at once")):
        spec.cpus_per_trial = cpus
        out = sweep.run(spec, uri, None, quiet)  # warm feature store: the trials are what is timed
        assert out.done == len(trials), out.results[["status", "error"]]
        runs = children(tracking.connect(uri), *_ids(uri, out.parent_run_id))
        inside = [r.data.metrics["trial_seconds"] for r in runs]
        rows.append((label, out.tune_seconds, out.seconds, int(2 // cpus)))
        print(
            f"{label}: inside trials {sum(inside):.2f} s (median {sorted(inside)[len(inside) // 2]:.3f} s); "
            f"Ray Tune + MLflow outside training {out.tune_seconds * int(2 // cpus) - sum(inside):.2f} s; "
            f"whole command {out.seconds:.1f} s"
        )

    n = len(trials)
    print(
        f"{n} trials (textile, {TINY} random, epochs {'by shots' if args.epochs is None else args.epochs}), "
        f"2 CPUs, {sys.platform}"
    )
    print(f"{'':28} {'trials s':>9} {'whole s':>8} {'vs loop':>8} {'overhead s/trial':>17}")
    for label, trial_s, whole_s, slots in rows:
        # Overhead per trial against the loop's work spread over the same number of slots.
        overhead = (trial_s - loop / slots) * slots / n
        print(f"{label:28} {trial_s:9.2f} {whole_s:8.2f} {trial_s / loop:8.2f}x {overhead:17.3f}")


def _ids(uri, parent_id):
    run = tracking.connect(uri).get_run(parent_id)
    return run.info.experiment_id, parent_id


if __name__ == "__main__":
    main()
