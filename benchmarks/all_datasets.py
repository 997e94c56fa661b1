"""The paper's protocol end to end on miniatures of all 11 CoOp layouts (plus textile), offline.

    python benchmarks/all_datasets.py [--shots 1,2,4] [--seeds 1,2,3] [--work DIR]

Generates each dataset's exact layout (split JSONs, FGVC's text files, ImageNet's classnames.txt)
with small noise images, runs `ca-flow sweep --datasets all` with every method on a tiny random
backbone, then `ca-flow report --paper`, and prints per method the trial count and trial seconds.
The accuracies mean nothing (random weights, noise images); the run shows the whole path works.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_coop_datasets as layouts  # noqa: E402  (the miniature generators the tests use)

METHODS = "clip-adapter,zero-shot,linear-probe,tip-adapter,tip-adapter-f"


def noise_image(path: Path) -> None:
    """A distinct 32 px image per file, so the feature cache encodes every one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path, "JPEG")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shots", default="1,2,4")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ca-flow-all-"))
    root = work / "data"
    root.mkdir(parents=True, exist_ok=True)
    layouts._image = noise_image
    for name in layouts.ALL:
        layouts.make(root, name)

    started = time.perf_counter()
    subprocess.run(
        [
            "ca-flow",
            "sweep",
            "--datasets",
            "all",
            "--data-root",
            str(root),
            "--methods",
            METHODS,
            "--backbone",
            "ca-flow-tiny",
            "--pretrained",
            "random",
            "--shots",
            args.shots,
            "--seeds",
            args.seeds,
            "--alphas",
            "0.2,0.6",
            "--cache-dir",
            str(work / "cache"),
        ],
        cwd=work,
        check=True,
    )
    sweep_s = time.perf_counter() - started
    subprocess.run(["ca-flow", "report", "--paper"], cwd=work, check=True)

    (results,) = (work / "ca-flow-results").glob("*.parquet")
    frame = pd.read_parquet(results)
    per = frame.groupby("method").agg(
        trials=("key", "size"),
        failed=("status", lambda s: (s != "FINISHED").sum()),
        trial_s_total=("trial_seconds", "sum"),
        trial_s_median=("trial_seconds", "median"),
    )
    print(
        f"\n{len(frame)} trials over {frame['dataset'].nunique()} datasets in {sweep_s:.1f} s "
        f"(sweep command, 2 CPUs); work folder {work}"
    )
    print(per.round(3).to_string())


if __name__ == "__main__":
    main()
