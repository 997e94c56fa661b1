"""Frozen CLIP backbones from open_clip: weights by tag, local file, or seeded random init."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import CaFlowError, first_line

if TYPE_CHECKING:
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


class BackboneError(CaFlowError, RuntimeError):
    """Requested weights or model cannot be loaded; never silently replaced."""


def model_names() -> list[str]:
    """open_clip's built-in model names plus ca-flow's tiny one, read from its config files.

    The same list as `open_clip.list_models()`, without importing open_clip and torch: argument
    checks answer in well under a second.
    """
    spec = importlib.util.find_spec("open_clip")
    configs = Path(next(iter(spec.submodule_search_locations))) / "model_configs" if spec else None
    names = sorted(p.stem for p in configs.glob("*.json")) if configs and configs.is_dir() else []
    return names + [TINY]


CROP_SCALE = 0.08  # CoOp's augmentation: RandomResizedCrop from 8% of the image


class Preprocess:
    """The model's image preprocessing, split where the pixels stop being an image.

    `geometric` (PIL -> PIL: resize and crop, or CoOp's augmentation) runs in CPU workers;
    `normalize` (uint8 batch -> float tensor) runs beside the encoder, so only uint8 crops travel
    between them. Together they equal the model's own ToTensor + Normalize transform.
    """

    def __init__(self, cfg: dict):
        self.cfg = dict(cfg)
        size = cfg["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = np.asarray(cfg["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(cfg["std"], dtype=np.float32).reshape(1, 3, 1, 1)
        self._test, self._train = None, {}

    def geometric(self, augment: bool, scale: float = CROP_SCALE) -> Callable:
        """The centre crop, or an augmented view: RandomResizedCrop from `scale` of the image to all of
        it + flip (CoOp's 0.08; Tip-Adapter and GDA crop from 0.5)."""
        import torchvision.transforms as T

        if augment:
            if scale not in self._train:
                self._train[scale] = T.Compose(
                    [
                        T.RandomResizedCrop(
                            self.size, scale=(scale, 1.0), interpolation=T.InterpolationMode.BICUBIC
                        ),
                        T.RandomHorizontalFlip(),
                    ]
                )
            return self._train[scale]
        if self._test is None:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            steps = image_transform_v2(PreprocessCfg(**self.cfg), is_train=False).transforms
            tensor_steps = [type(t).__name__ for t in steps[-2:]]
            if tensor_steps != ["MaybeToTensor", "Normalize"]:
                raise BackboneError(
                    f"unexpected open_clip test transform {tensor_steps}; ca-flow splits it "
                    f"before ToTensor + Normalize"
                )
            self._test = T.Compose(steps[:-2])
        return self._test

    def normalize(self, pixels, device: str = "cpu"):
        """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] on `device`, as ToTensor then Normalize compute it.

        The uint8 crops move to the device before they become floats: a quarter of the bytes.
        """
        import torch

        x = torch.as_tensor(pixels).to(device).permute(0, 3, 1, 2).contiguous().float().div(255)
        return (x - torch.from_numpy(self.mean).to(device)) / torch.from_numpy(self.std).to(device)


@dataclass
class Backbone:
    name: str
    weights: str  # what the user asked for: a tag, a file path, or "random"
    weights_id: str  # identity of the weights actually loaded (tag, file sha256, random seed)
    model: torch.nn.Module
    preprocess: Preprocess
    tokenizer: Callable
    device: str

    @property
    def width(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().item())

    @property
    def preprocess_cfg(self) -> dict:
        """Plain data (size, mean, std, interpolation, ...): workers rebuild `Preprocess` from it."""
        cfg = dict(self.model.visual.preprocess_cfg)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}

    def encode_images(self, batch):
        """Un-normalised image features, float32 on CPU."""
        import torch

        with torch.no_grad():
            return self.model.encode_image(batch.to(self.device)).float().cpu()

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Features [n, D] for uint8 crops [n, H, W, 3] (the output of `preprocess.geometric`)."""
        return self.encode_images(self.preprocess.normalize(pixels, self.device)).numpy()

    def encode_text(self, texts: list[str]):
        import torch

        with torch.no_grad():
            return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu()


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


def load_backbone(name: str, weights: str = "openai", device: str | None = None) -> Backbone:
    """Build `name` with `weights`: an open_clip pretrained tag, a local weights file, or "random"."""
    import torch

    open_clip = _open_clip()
    if name not in open_clip.list_models():
        raise BackboneError(
            f"unknown backbone {name!r}; choose one of open_clip.list_models(), "
            f"e.g. RN50-quickgelu, ViT-B-32-quickgelu, or {TINY} for tests"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(
            f"device {device} requested but torch sees no CUDA device; check the node's "
            f"GPU and CUDA build of torch"
        )
    if weights == RANDOM:
        # Seeded so that every process (trial, server, predict) rebuilds the same network.
        state = torch.random.get_rng_state()
        torch.manual_seed(RANDOM_SEED)
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly": that is the request
        try:
            model = open_clip.create_model(name, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
            torch.random.set_rng_state(state)
    else:
        looks_like_path = any(sep in weights for sep in "/\\") or weights.endswith(
            (".pt", ".bin", ".safetensors")
        )
        if looks_like_path and not Path(weights).expanduser().is_file():
            raise BackboneError(
                f"weights file {weights} does not exist; pass an existing file, "
                f"a pretrained tag (e.g. openai) or 'random'"
            )
        try:
            model = open_clip.create_model(
                name, pretrained=str(Path(weights).expanduser()) if looks_like_path else weights
            )
        except Exception as exc:  # open_clip raises many types: network, key mismatch, unknown tag
            raise BackboneError(
                f"cannot load {weights!r} weights for {name}: {first_line(exc, 10_000)}; check the tag/file",
                hint="random_weights",
            ) from exc
    model.eval().requires_grad_(False).to(device)
    backbone = Backbone(
        name=name,
        weights=weights,
        weights_id=weights_identity(weights),
        model=model,
        preprocess=None,
        tokenizer=open_clip.get_tokenizer(name),
        device=device,
    )
    backbone.preprocess = Preprocess(backbone.preprocess_cfg)
    return backbone
