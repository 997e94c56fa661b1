"""Adapter artifacts: weights in safetensors, everything else in JSON. Nothing is unpickled."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save

from .backbone import RANDOM, Backbone, BackboneError, load_backbone, weights_identity
from .images import decode
from .methods import make
from .methods.base import Method

FORMAT = "ca-flow-adapter/2"
WEIGHTS, META = "adapter.safetensors", "adapter.json"
TEXT = "text_classifier"  # beside the method's own tensors: every method is rebuilt from it


@dataclass
class AdapterMeta:
    method: str  # a name in clip_adapter.methods.METHODS
    config: dict  # the method's hyperparameters (alpha, beta, ... for CLIP-Adapter)
    backbone: str
    weights: str
    weights_id: str
    classnames: list[str]
    template: str | list[str]
    logit_scale: float
    dataset: str = ""
    format: str = FORMAT


def adapter_files(method: Method, text: torch.Tensor, meta: AdapterMeta) -> dict[str, bytes]:
    """The artifact as {file name: bytes}: what `save_adapter` writes, for sending it elsewhere."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    tensors[TEXT] = torch.as_tensor(text, dtype=torch.float32).cpu().contiguous()
    return {WEIGHTS: save(tensors), META: json.dumps(asdict(meta), indent=2).encode()}


def save_adapter(directory: str | Path, method: Method, text: torch.Tensor, meta: AdapterMeta) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = adapter_files(method, text, meta)
    (directory / WEIGHTS).write_bytes(files[WEIGHTS])
    tmp = directory / (META + ".tmp")
    tmp.write_bytes(files[META])
    os.replace(tmp, directory / META)  # the JSON last: a folder with it is complete
    return directory


def load_adapter(directory: str | Path) -> tuple[Method, AdapterMeta]:
    directory = Path(directory)
    meta = AdapterMeta(**json.loads((directory / META).read_text()))
    if meta.format != FORMAT:
        raise ValueError(f"{directory / META}: format {meta.format!r}, expected {FORMAT!r}")
    state = load_file(str(directory / WEIGHTS))
    method = make(meta.method, state.pop(TEXT), meta.logit_scale, **meta.config)
    method.load_state_dict(state)
    return method.eval(), meta


def _to_image(image) -> Image.Image:
    """A PIL image, image bytes, or a local file path; unreadable input raises images.ImageError."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return decode(bytes(image))
    return decode(Path(image).read_bytes())


class AdapterClassifier:
    """Backbone + adapter: images in, class probabilities out."""

    def __init__(self, directory: str | Path, device: str | None = None):
        self.method, self.meta = load_adapter(directory)
        if self.meta.weights != RANDOM and weights_identity(self.meta.weights) != self.meta.weights_id:
            raise BackboneError(
                f"weights {self.meta.weights} are not the ones this adapter was trained on "
                f"({self.meta.weights_id}); restore that file"
            )
        self.backbone: Backbone = load_backbone(self.meta.backbone, self.meta.weights, device)
        self.method.to(self.backbone.device)

    @torch.no_grad()
    def probabilities(self, images: list) -> torch.Tensor:
        crop = self.backbone.preprocess.geometric(augment=False)
        pixels = np.stack([np.asarray(crop(_to_image(im)), dtype=np.uint8) for im in images])
        feats = torch.from_numpy(self.backbone.encode_pixels(pixels)).to(self.backbone.device)
        return self.method(feats).softmax(-1).cpu()

    def predict(self, images: list, top_k: int = 3) -> list[list[tuple[str, float]]]:
        probs = self.probabilities(images)
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=-1)
        return [
            [(self.meta.classnames[i], float(p)) for p, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)
        ]
