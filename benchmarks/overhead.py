"""Seconds per trial that Ray Tune + MLflow add: the same trials in a plain loop vs `ca-flow sweep`.

    python benchmarks/overhead.py [--epochs N] [--shots 1,2,4,8] [--seeds 1,2,3] [--alphas ...]

Prints, side by side from one run: the plain loop (fit + evaluate on the same cached features, no
Ray, no MLflow), the sweep with one trial at a time (--cpus-per-trial 2), and the sweep with two at
once (--cpus-per-trial 1), each with its per-trial overhead and ratio to the loop.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from clip_adapter import datasets as ds  # noqa: E402
from clip_adapter.backbone import TINY  # noqa: E402
from clip_adapter.features import FeatureCache, LocalEncoder  # noqa: E402
from workflows.sweep import SweepSpec, dataset_features, grid, run_sweep, train_trial  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=None, help="default: CoOp's by shots")
    ap.add_argument("--shots", default="1,2,4,8")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--alphas", default="0.2,0.4,0.6,0.8")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ca-flow-bench-"))
    spec = SweepSpec(datasets="textile", backbone=TINY, pretrained="random", epochs=args.epochs,
                     shots=[int(x) for x in args.shots.split(",")], seeds=[int(x) for x in args.seeds.split(",")],
                     alphas=[float(x) for x in args.alphas.split(",")], cache_dir=work / "cache",
                     tracking_uri=f"sqlite:///{work / 'mlflow.db'}", results_dir=work / "results")
    split = ds.load(ds.resolve("textile", spec.data_root)[0])
    cache = FeatureCache(spec.cache_dir, spec.backbone, spec.pretrained)
    data = dataset_features(split, spec, cache, LocalEncoder(spec.backbone, spec.pretrained), lambda p, r: None)
    trials = grid(spec, ["textile"])

    torch.set_num_threads(1)  # what each trial gets in the sweep
    started = time.perf_counter()
    for t in trials:
        train_trial(t, data)
    loop = time.perf_counter() - started

    quiet = Console(file=open(os.devnull, "w"))
    rows = [("plain loop (1 at a time)", loop, loop, 1)]
    for cpus, label in ((2.0, "ca-flow sweep, 1 at a time"), (1.0, "ca-flow sweep, 2 at once")):
        spec.cpus_per_trial = cpus
        result = run_sweep(spec, quiet)  # warm feature cache: the trials are what is timed
        assert result.failed == 0, result.results["error"].tolist()
        rows.append((label, result.tune_seconds, result.seconds, int(2 // cpus)))
        inside, logging = result.results["trial_seconds"], result.results["mlflow_seconds"]
        print(f"{label}: inside trials {inside.sum():.2f} s (slowest {inside.max():.2f} s, median "
              f"{inside.median():.3f} s), of which MLflow logging {logging.sum():.2f} s (median "
              f"{logging.median():.3f} s); Ray Tune outside trials {result.tune_seconds * int(2 // cpus) - inside.sum():.2f} s")

    n = len(trials)
    print(f"{n} trials (textile, {TINY} random, epochs {'by shots' if args.epochs is None else args.epochs}), "
          f"2 CPUs, {sys.platform}")
    print(f"{'':28} {'trials s':>9} {'whole s':>8} {'vs loop':>8} {'overhead s/trial':>17}")
    for label, trial_s, whole_s, slots in rows:
        # Overhead per trial against the loop's work spread over the same number of slots.
        overhead = (trial_s - loop / slots) * slots / n
        print(f"{label:28} {trial_s:9.2f} {whole_s:8.2f} {trial_s / loop:8.2f}x {overhead:17.3f}")


if __name__ == "__main__":
    main()
