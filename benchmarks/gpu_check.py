"""The GPU path of the library, checked against the CPU path and timed (needs a CUDA device).

    python benchmarks/gpu_check.py [--backbone RN50-quickgelu] [--out result.json]

1. Features: the same textile images encoded on CUDA and on the CPU agree (relative error).
2. Encoding throughput on CUDA against the CPU, images per second, side by side.
3. Training: a CLIP-Adapter on ImageNet-sized planted features (1000 classes x 16 shots x 10 views)
   for a few epochs on CUDA and on the CPU: seconds per epoch and the ratio, and that the losses agree.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from clip_adapter import CLIPAdapter, TrainConfig, fit
from clip_adapter import datasets as ds
from clip_adapter.features import encode_blobs, read_images
from clip_adapter.backbone import load_backbone


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="RN50-quickgelu")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA device"
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "backbone": args.backbone}

    split = ds.load(ds.resolve("textile", ds.default_data_root())[0])
    blobs, _ = read_images(split.test[: args.images])
    gpu = load_backbone(args.backbone, "random", "cuda")
    cpu = load_backbone(args.backbone, "random", "cpu")
    encode_blobs(gpu, blobs[:64], 1, False)  # warm-up: cuDNN autotune, allocator
    (f_gpu, _), t_gpu = timed(lambda: encode_blobs(gpu, blobs, 1, False, batch_size=256))
    n_cpu = min(len(blobs), 128)
    (f_cpu, _), t_cpu = timed(lambda: encode_blobs(cpu, blobs[:n_cpu], 1, False))
    rel = np.abs(f_gpu[:n_cpu] - f_cpu).max() / np.abs(f_cpu).max()
    report["encode"] = {"gpu_images_per_s": len(blobs) / t_gpu, "cpu_images_per_s": n_cpu / t_cpu,
                        "speedup": (len(blobs) / t_gpu) / (n_cpu / t_cpu), "max_rel_diff_gpu_vs_cpu": float(rel)}

    rng = np.random.default_rng(0)
    classes, shots, views, dim = 1000, 16, 10, gpu.width
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = np.repeat(np.arange(classes), shots)
    feats = (centers[labels][:, None, :] + 4.0 * rng.normal(size=(len(labels), views, dim))).astype(np.float32)
    text = torch.from_numpy(centers + 0.8 * rng.normal(size=centers.shape).astype(np.float32))
    cfg = TrainConfig(epochs=3)
    results = {}
    for device in ("cuda", "cpu"):
        torch.manual_seed(0)
        adapter = CLIPAdapter(text, 100.0, alpha=0.2).to(device)
        losses, secs = timed(lambda: fit(adapter, feats, labels, cfg, seed=1))
        results[device] = (losses, secs / cfg.epochs)
    report["train"] = {"samples": len(labels), "cuda_s_per_epoch": results["cuda"][1],
                       "cpu_s_per_epoch": results["cpu"][1],
                       "speedup": results["cpu"][1] / results["cuda"][1],
                       "losses_cuda": results["cuda"][0], "losses_cpu": results["cpu"][0]}
    text_json = json.dumps(report, indent=2)
    print(text_json)
    if args.out:
        open(args.out, "w").write(text_json)


if __name__ == "__main__":
    main()
