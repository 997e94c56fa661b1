"""The encoding pipeline against the plain loop it is held to, on the same images, side by side.

    python benchmarks/encode.py [--images 4000] [--data DIR]

The loop reads, decodes, crops and encodes in this process (2 torch threads). The pipeline is
workflows/encode.py's Ray Data pipeline on a local 2-CPU Ray: CPU crop tasks feeding an encoder actor.
Printed: time to the first feature (Ray workers start, the encoder loads its model), steady
throughput (images 25% -> 100%), and the whole run. Uses benchmarks/scale.py's generated noise JPEGs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def timed(rows, n: int) -> dict:
    """first row, steady rate over the last three quarters, whole run."""
    start = time.perf_counter()
    first = quarter = None
    done = 0
    for _ in rows:
        done += 1
        if first is None:
            first = time.perf_counter() - start
        if done == n // 4:
            quarter = time.perf_counter()
    end = time.perf_counter()
    return dict(first=first, steady=(done - n // 4) / (end - quarter), whole=end - start, n=done)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--data", default=None, help="where scale.py's images are (default: made in a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster that lives for this run
    import ray
    import torch
    from ray.data import DataContext
    from scale import make_images

    from clip_adapter import datasets
    from clip_adapter.backbone import TINY, load_backbone
    from clip_adapter.encoding import encode_in_process
    from clip_adapter.features import Request
    from workflows.encode import pipeline

    data = Path(args.data or tempfile.mkdtemp(prefix="ca-flow-encode-"))
    folder = make_images(data, 20000)  # its test split (30 %) holds 6,000 images
    split = datasets.load(datasets.resolve(folder.name, data)[0])
    reqs = [Request(folder.name, i.path, "", 0, 0, [0], False) for i in split.test[: args.images]]
    n = len(reqs)

    torch.set_num_threads(2)
    backbone = load_backbone(TINY, "random", "cpu")
    loop = timed(encode_in_process(backbone, reqs), n)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    DataContext.get_current().enable_progress_bars = False
    ray_data = timed(pipeline(reqs, TINY, "random", backbone.preprocess_cfg, 0.0, 1, 1), n)
    ray.shutdown()

    print(f"{n} noise JPEGs (256 px), {TINY} random, 2 CPUs")
    print(f"{'':22} {'first feature s':>15} {'steady img/s':>12} {'whole s':>8} {'steady vs loop':>14}")
    for label, r in (("plain loop", loop), ("Ray Data pipeline", ray_data)):
        assert r["n"] == n, (label, r["n"], n)
        print(
            f"{label:22} {r['first']:15.2f} {r['steady']:12.0f} {r['whole']:8.1f} "
            f"{r['steady'] / loop['steady']:13.2f}x"
        )


if __name__ == "__main__":
    main()
