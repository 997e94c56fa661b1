"""Frozen CLIP backbones from open_clip: weights by tag, local file, or seeded random init."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

RANDOM = "random"
RANDOM_SEED = 0

# A tiny config for tests and offline demos: builds in well under a second and encodes
# hundreds of 64 px images per second on a laptop CPU.
TINY = "ca-flow-tiny"


def _open_clip():
    """open_clip (and torchvision) on first use: a trial process, which only trains, never pays."""
    import open_clip

    if TINY not in open_clip.list_models():
        open_clip.add_model_config(Path(__file__).with_name(f"{TINY}.json"))
    return open_clip


class BackboneError(RuntimeError):
    """Requested weights or model cannot be loaded; never silently replaced."""


@dataclass
class Backbone:
    name: str
    weights: str          # what the user asked for: a tag, a file path, or "random"
    weights_id: str       # identity of the weights actually loaded (tag, file sha256, random seed)
    model: torch.nn.Module
    train_transform: Callable
    test_transform: Callable
    tokenizer: Callable
    device: str

    @property
    def width(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().item())

    @property
    def is_random(self) -> bool:
        return self.weights == RANDOM

    @torch.no_grad()
    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """Un-normalised image features, float32 on CPU."""
        return self.model.encode_image(batch.to(self.device)).float().cpu()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu()


def coop_train_transform(test_transform):
    """CoOp's augmentation (RandomResizedCrop 0.08-1, flip) at the model's size and normalisation."""
    import torchvision.transforms as T

    size = next(t.size for t in test_transform.transforms if isinstance(t, T.CenterCrop))
    norm = next(t for t in test_transform.transforms if isinstance(t, T.Normalize))
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        norm,
    ])


def weights_identity(weights: str) -> str:
    """A string that changes whenever the loaded weights would change."""
    if weights == RANDOM:
        return f"random-seed{RANDOM_SEED}"
    path = Path(weights).expanduser()
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return f"file-sha256-{digest.hexdigest()[:16]}"
    return f"tag-{weights}"


def available_models() -> list[str]:
    return _open_clip().list_models()


def load_backbone(name: str, weights: str = "openai", device: str | None = None) -> Backbone:
    """Build `name` with `weights`: an open_clip pretrained tag, a local weights file, or "random"."""
    open_clip = _open_clip()
    if name not in open_clip.list_models():
        raise BackboneError(f"unknown backbone {name!r}; choose one of open_clip.list_models(), "
                            f"e.g. RN50-quickgelu, ViT-B-32-quickgelu, or {TINY} for tests")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(f"device {device} requested but torch sees no CUDA device; check the node's "
                            f"GPU and CUDA build of torch")
    if weights == RANDOM:
        # Seeded so that every process (trial, server, predict) rebuilds the same network.
        state = torch.random.get_rng_state()
        torch.manual_seed(RANDOM_SEED)
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly": that is the request
        try:
            model, _, test_tf = open_clip.create_model_and_transforms(name, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
            torch.random.set_rng_state(state)
    else:
        looks_like_path = any(sep in weights for sep in "/\\") or weights.endswith((".pt", ".bin", ".safetensors"))
        if looks_like_path and not Path(weights).expanduser().is_file():
            raise BackboneError(f"weights file {weights} does not exist; pass an existing file, "
                                f"a pretrained tag (e.g. openai) or 'random'")
        try:
            model, _, test_tf = open_clip.create_model_and_transforms(
                name, pretrained=str(Path(weights).expanduser()) if looks_like_path else weights)
        except Exception as exc:  # open_clip raises many types: network, key mismatch, unknown tag
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackboneError(f"cannot load {weights!r} weights for {name}: {first}; "
                                f"check the tag/file, or use --pretrained random for an offline demo") from exc
    model.eval().requires_grad_(False).to(device)
    return Backbone(name=name, weights=weights, weights_id=weights_identity(weights), model=model,
                    train_transform=coop_train_transform(test_tf), test_transform=test_tf,
                    tokenizer=open_clip.get_tokenizer(name), device=device)
