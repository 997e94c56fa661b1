"""Packed trials against one trial per grid point: the same grid, both ways, in one run.

    python benchmarks/pack.py [--shots 2] [--seeds 1,...,10] [--alphas 8 and 4 values] [--repeat 3]

For each alpha list (default: 8 alphas, then the paper's 4), the sweep (warm feature store, real Ray
Tune and MLflow in this process, 2 trials at once) unpacked and with --pack: wall seconds of the whole
sweep and of its Tune phase, seconds per grid point, and the marginal seconds per grid point (the
sweep of every seed against the sweep of the first seed alone: what a further point costs once the
start-up is paid, Tune's trial actors and the recorder included), with the ratio. Then the training loop alone, no Ray or MLflow:
K adapters fitted one after another against one stacked fit of K, on the same features, to tell
training from orchestration. With --repeat N each figure is the median of N, with its spread.
"""

from __future__ import annotations

import argparse
import os
import statistics
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
from clip_adapter.methods import make  # noqa: E402
from clip_adapter.methods.clip_adapter import fit_packed  # noqa: E402
from workflows import sweep  # noqa: E402
from workflows.encode import dataset_features  # noqa: E402
from workflows.grid import SweepSpec, grid, packs  # noqa: E402
from workflows.trial import _few_shot  # noqa: E402

ALPHAS8 = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8"
PAPER = "0.2,0.4,0.6,0.8"


def spread(xs: list[float]) -> str:
    med = statistics.median(xs)
    return f"{med:7.2f}" + (f" ({min(xs):.2f}-{max(xs):.2f})" if len(xs) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shots", default="2")
    ap.add_argument(
        "--seeds", default="1,2,3,4,5,6,7,8,9,10", help="the grid; its first seed alone gives the fixed cost"
    )
    ap.add_argument("--epochs", type=int, default=None, help="default: CoOp's by shots")
    ap.add_argument("--alphas", nargs="+", default=[ALPHAS8, PAPER])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ca-flow-pack-"))
    base = dict(
        datasets="textile",
        backbone=TINY,
        pretrained="random",
        methods=["clip-adapter"],
        shots=[int(x) for x in args.shots.split(",")],
        seeds=[int(x) for x in args.seeds.split(",")],
        epochs=args.epochs,
        cache_dir=str(work / "cache"),
        results_dir=str(work / "results"),
        storage_path=str(work / "ray_results"),
    )
    uri = f"sqlite:///{work / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    quiet = Console(file=open(os.devnull, "w"))
    warm = SweepSpec(**dict(base, alphas=[0.2], seeds=base["seeds"][:1])).validate()
    assert sweep.run(warm, uri, None, quiet).done == len(
        base["shots"]
    )  # encodes the features; warms Ray's workers

    sweeps = []
    for alphas in args.alphas:
        for pack in (False, True):
            runs = {}
            for seeds in (base["seeds"][:1], base["seeds"]):  # the fixed cost, then the grid
                spec = SweepSpec(
                    **dict(base, seeds=seeds), alphas=[float(a) for a in alphas.split(",")], pack=pack
                ).validate()
                points = grid(spec, ["textile"])
                whole, tune = [], []
                for _ in range(args.repeat):
                    out = sweep.run(spec, uri, None, quiet)
                    assert out.done == len(points), out.results[["status", "error"]]
                    whole.append(out.seconds)
                    tune.append(out.tune_seconds)
                runs[len(seeds)] = (len(points), len(packs(points, pack)), whole, tune)
            sweeps.append((len(spec.alphas), pack, runs[1], runs[len(base["seeds"])]))

    # The training loop alone: one dataset split, K fits one after another vs one stacked fit of K.
    split = datasets.load(datasets.resolve("textile", datasets.default_data_root())[0])
    spec = SweepSpec(**base, alphas=[0.2]).validate()
    data = dataset_features(
        [split],
        spec,
        FeatureStore(spec.cache_dir, spec.backbone, spec.pretrained),
        0.0,
        1,
        1,
        lambda p, r: None,
    )["textile"]
    point = grid(spec, ["textile"])[0]
    few, _ = _few_shot(point, data)
    torch.set_num_threads(1)  # what each trial gets in the sweep
    loops = []
    for alphas in args.alphas:
        ratios = [float(a) for a in alphas.split(",")]

        def methods(ratios=ratios):
            rest = {k: v for k, v in point.hparams.items() if k != "alpha"}
            return [make("clip-adapter", data.text, data.logit_scale, alpha=a, **rest) for a in ratios]

        separate, stacked = [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            for m in methods():
                m.fit(few, point.seed)
            separate.append(time.perf_counter() - started)
            started = time.perf_counter()
            fit_packed(methods(), few, point.seed)
            stacked.append(time.perf_counter() - started)
        loops.append((len(ratios), separate, stacked))

    print(
        f"textile, {TINY} random, shots {args.shots}, seeds {args.seeds}, epochs "
        f"{'by shots' if args.epochs is None else args.epochs}, 2 trials at once on 2 CPUs, {sys.platform}, "
        f"median of {args.repeat} (min-max)"
    )
    print(
        f"{'alphas':>6} {'mode':>9} {'points':>6} {'Tune trials':>11} {'whole s':>20} {'Tune phase s':>20} "
        f"{'s/point (whole)':>20} {'marginal s/point':>17}"
    )
    marginal = {}
    for n_alpha, pack, (p1, _, whole1, _), (points, trials, whole, tune) in sweeps:
        # What each further grid point costs: the whole sweep's growth from one seed to all of them.
        marginal[(n_alpha, pack)] = (statistics.median(whole) - statistics.median(whole1)) / (points - p1)
        print(
            f"{n_alpha:>6} {'packed' if pack else 'unpacked':>9} {points:>6} {trials:>11} {spread(whole):>20} "
            f"{spread(tune):>20} {spread([w / points for w in whole]):>20} {marginal[(n_alpha, pack)]:17.3f}"
        )
    for n_alpha in sorted({k[0] for k in marginal}, reverse=True):
        m0, m1 = marginal[(n_alpha, False)], marginal[(n_alpha, True)]
        print(
            f"{n_alpha} alphas: each further grid point costs {m0 / m1:.2f}x less packed ({m1:.3f} vs {m0:.3f} s)"
        )
    print(f"training loop alone ({point.hparams['epochs']} epochs, {len(few.train)} images, 1 thread):")
    for k, separate, stacked in loops:
        print(
            f"  K={k}: {k} separate fits {spread(separate)} s, one stacked fit {spread(stacked)} s, "
            f"{statistics.median(separate) / statistics.median(stacked):.2f}x"
        )


if __name__ == "__main__":
    main()
