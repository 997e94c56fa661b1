"""The GPU path of the library, checked against the CPU path and timed (needs a CUDA device).

    python benchmarks/gpu_check.py [--backbone RN50-quickgelu] [--out result.json]

1. Features: the same textile images encoded on CUDA and on the CPU agree (relative error).
2. Encoding throughput on CUDA against the CPU, images per second, side by side.
3. The sweep's encoder stage (workflows.encode: its crop_batch stage on the CPU, then the Encoder actor
   class's work, clip_adapter.encoding.encode_crops on its backbone, called directly here because Ray
   does not fit on the GPU machine): images/s and the fraction of
   its time the GPU is busy, against open_clip's raw forward on the same, already normalised batch
   (the bound).
4. Training: a CLIP-Adapter on ImageNet-sized planted features (1000 classes x 16 shots x 10 views)
   for a few epochs on CUDA and on the CPU: seconds per epoch and the ratio, and that the losses agree.
5. Packed trials: K = 1, 4, 16, 64 stacked adapters (--pack) on 16,000 x 1,024 features, 1,000 classes,
   batch 32: steps/s and GPU seconds per adapter-epoch, against one unpacked adapter at a time.
   `--only-pack` runs just this part (no backbone, no images).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np
import torch

from clip_adapter import CLIPAdapter, TrainConfig, datasets, fit
from clip_adapter.adapter import StackedCLIPAdapter
from clip_adapter.backbone import load_backbone
from clip_adapter.encoding import ENCODE_BATCH, encode_crops, encode_in_process, request_batch
from clip_adapter.features import Request
from workflows.encode import Encoder, crop_batch


def encode(backbone, items):
    """Features [n, D] of items, read + decoded + cropped + encoded in this process."""
    reqs = [Request("textile", i.path, "", 0, 0, [0], False) for i in items]
    return np.stack([row["feature"] for row in encode_in_process(backbone, reqs, batch_size=256)])


def encoder_stage(backbone_name, items):
    """The sweep's two stages as Ray Data calls them: CPU crops, then the encoder class on CUDA."""
    enc = Encoder(backbone_name, "random", "cuda", threads=1)
    batch = request_batch([Request("textile", i.path, "", 0, 0, [0], False) for i in items])
    # CPU work, done before the clock starts: the GPU stage is timed
    crops = crop_batch(batch, enc.backbone.preprocess_cfg)
    encode_crops(enc.backbone, {k: v[:ENCODE_BATCH] for k, v in crops.items()})  # warm-up
    samples, done = [], threading.Event()

    def sample():  # the driver's view of the GPU: % of time a kernel ran, every 10 ms (NVML)
        while not done.wait(0.01):
            try:
                samples.append(torch.cuda.utilization())
            except Exception:
                return

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    for start in range(0, len(items), ENCODE_BATCH):
        encode_crops(enc.backbone, {k: v[start : start + ENCODE_BATCH] for k, v in crops.items()})
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    done.set()
    # The bound: open_clip's own forward on the same crops, already normalised on the GPU.
    pixels = enc.backbone.preprocess.normalize(crops["pixels"], "cuda")
    with torch.no_grad():
        enc.backbone.model.encode_image(pixels[:ENCODE_BATCH])
        (_, raw) = timed(
            lambda: [
                enc.backbone.model.encode_image(pixels[s : s + ENCODE_BATCH])
                for s in range(0, len(items), ENCODE_BATCH)
            ]
        )
    return {
        "images_per_s": len(items) / wall,
        "raw_forward_images_per_s": len(items) / raw,
        "vs_raw_forward": raw / wall,
        "gpu_busy_fraction": (sum(samples) / len(samples) / 100) if samples else None,
    }


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def packed(ks=(1, 4, 16, 64), n=16_000, dim=1024, classes=1000, views=2, epochs=1) -> dict:
    """Stacked adapters on one batch stream: what one packed Tune trial does per step, on CUDA."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(classes, size=n)
    feats = (centers[labels][:, None, :] + 4.0 * rng.normal(size=(n, views, dim))).astype(np.float32)
    text = torch.from_numpy(centers)
    cfg, steps = TrainConfig(epochs=epochs), epochs * -(-n // 32)
    torch.manual_seed(0)
    single = CLIPAdapter(text, 100.0, alpha=0.2).cuda()  # the unpacked trial's model: K of these one by one
    fit(single, feats[:512], labels[:512], TrainConfig(epochs=1), seed=1)
    _, secs = timed(lambda: fit(single, feats, labels, cfg, seed=1))
    out = {"separate": {"steps_per_s": steps / secs, "gpu_s_per_adapter_epoch": secs / epochs}}
    for k in ks:
        torch.manual_seed(0)
        members = [CLIPAdapter(text, 100.0, alpha=a) for a in np.linspace(0.1, 0.9, k)]
        model = StackedCLIPAdapter(members).cuda()
        fit(model, feats[:512], labels[:512], TrainConfig(epochs=1), seed=1)  # warm-up: kernels, allocator
        _, secs = timed(lambda: fit(model, feats, labels, cfg, seed=1))
        out[f"K={k}"] = {"steps_per_s": steps / secs, "gpu_s_per_adapter_epoch": secs / (k * epochs)}
    one = out["separate"]["gpu_s_per_adapter_epoch"]
    for k in ks:
        out[f"K={k}"]["vs_separate"] = one / out[f"K={k}"]["gpu_s_per_adapter_epoch"]
    return {"features": [n, views, dim], "classes": classes, "batch": 32, "epochs": epochs, **out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="RN50-quickgelu")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--only-pack", action="store_true", help="only the packed-trials comparison (part 5)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA device"
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "backbone": args.backbone}
    if args.only_pack:
        report["packed"] = packed()
        return _emit(report, args.out)

    split = datasets.load(datasets.resolve("textile", datasets.default_data_root())[0])
    items = split.test[: args.images]
    gpu = load_backbone(args.backbone, "random", "cuda")
    cpu = load_backbone(args.backbone, "random", "cpu")
    encode(gpu, items[:64])  # warm-up: cuDNN autotune, allocator
    f_gpu, t_gpu = timed(lambda: encode(gpu, items))
    n_cpu = min(len(items), 128)
    f_cpu, t_cpu = timed(lambda: encode(cpu, items[:n_cpu]))
    rel = np.abs(f_gpu[:n_cpu] - f_cpu).max() / np.abs(f_cpu).max()
    report["encode"] = {
        "gpu_images_per_s": len(items) / t_gpu,
        "cpu_images_per_s": n_cpu / t_cpu,
        "speedup": (len(items) / t_gpu) / (n_cpu / t_cpu),
        "max_rel_diff_gpu_vs_cpu": float(rel),
    }
    report["encoder_stage"] = encoder_stage(args.backbone, items)

    rng = np.random.default_rng(0)
    classes, shots, views, dim = 1000, 16, 10, gpu.width
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = np.repeat(np.arange(classes), shots)
    feats = (centers[labels][:, None, :] + 4.0 * rng.normal(size=(len(labels), views, dim))).astype(
        np.float32
    )
    text = torch.from_numpy(centers + 0.8 * rng.normal(size=centers.shape).astype(np.float32))
    cfg = TrainConfig(epochs=3)
    results = {}
    for device in ("cuda", "cpu"):
        torch.manual_seed(0)
        adapter = CLIPAdapter(text, 100.0, alpha=0.2).to(device)
        losses, secs = timed(lambda: fit(adapter, feats, labels, cfg, seed=1))
        results[device] = (losses, secs / cfg.epochs)
    report["train"] = {
        "samples": len(labels),
        "cuda_s_per_epoch": results["cuda"][1],
        "cpu_s_per_epoch": results["cpu"][1],
        "speedup": results["cpu"][1] / results["cuda"][1],
        "losses_cuda": results["cuda"][0],
        "losses_cpu": results["cpu"][0],
    }
    report["packed"] = packed()
    _emit(report, args.out)


def _emit(report: dict, out: str | None) -> None:
    text_json = json.dumps(report, indent=2)
    print(text_json)
    if out:
        open(out, "w").write(text_json)


if __name__ == "__main__":
    main()
