"""Oracles written out here, sharing no code with ca-flow: what a promoted CLIP-Adapter predicts.

The adapter's files are read with safetensors and json; the backbone is open_clip's own model and test
transform; the method is the released CLIP-Adapter's forward pass, written out:

    A(x) = ReLU(ReLU(x W1^T) W2^T)                      (bias-free bottleneck, D -> D/4 -> D)
    f* = alpha A_v(f) + (1 - alpha) f,  W* = beta A_t(W) + (1 - beta) W    (where the variant adapts)
    p = softmax(s * (f* / |f*|) (W* / |W*|)^T),  the top k of p
"""

from __future__ import annotations

import json
from pathlib import Path

RANDOM_SEED = 0  # ca-flow's "random" weights are open_clip's initialisation under torch.manual_seed(0)


def clip_adapter_top(folder: str | Path, image: str | Path, k: int) -> list[tuple[str, float]]:
    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["method"] == "clip-adapter", meta["method"]
    tensors = load_file(str(folder / "adapter.safetensors"))
    if meta["weights"] == "random":
        torch.manual_seed(RANDOM_SEED)
        model = open_clip.create_model(meta["backbone"], pretrained=None)
    else:
        model = open_clip.create_model(meta["backbone"], pretrained=meta["weights"])
    _, _, transform = open_clip.create_model_and_transforms(meta["backbone"], pretrained=None)
    with torch.no_grad():
        f = model.eval().encode_image(transform(Image.open(image).convert("RGB"))[None]).float()
        w = tensors["adapter.text_weights"]

        def bottleneck(x, side):
            w1, w2 = tensors[f"adapter.{side}.0.weight"], tensors[f"adapter.{side}.2.weight"]
            return torch.relu(torch.relu(x @ w1.T) @ w2.T)

        config = meta["config"]
        if config["variant"] in ("visual", "both"):
            f = config["alpha"] * bottleneck(f, "visual") + (1 - config["alpha"]) * f
        if config["variant"] in ("text", "both"):
            w = config["beta"] * bottleneck(w, "text") + (1 - config["beta"]) * w
        f, w = f / f.norm(dim=-1, keepdim=True), w / w.norm(dim=-1, keepdim=True)
        p = (meta["logit_scale"] * f @ w.T).softmax(-1)[0]
    top = p.topk(min(k, len(p)))
    return [(meta["classnames"][i], float(v)) for v, i in zip(top.values.tolist(), top.indices.tolist())]
