"""Images and class names to CLIP features: read, crop and encode a batch of images; the text classifier.

A batch goes through two steps, `crop_batch` (CPU: read, hash, decode, crop) and `encode_crops`
(the backbone's forward passes), whether this process runs both (`encode_in_process`) or the sweep's
Ray pipeline runs them in separate tasks and actors (workflows/encode.py): both give the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .datasets.fs import read_bytes
from .images import ImageError, crops, decode, image_id

ENCODE_BATCH = 64  # crops per forward pass of the backbone


def crop_batch(batch: dict, preprocess) -> dict:
    """Read, hash, decode and crop the images of a batch (columns request, path, views, augment, scale):
    one row per (image, view) out (columns request, image_id, view, pixels, error). An image that cannot
    be read gives one row: view -1, blank pixels, and why in `error`."""
    out = dict(request=[], image_id=[], view=[], pixels=[], error=[])
    blank = np.zeros((*preprocess.size, 3), dtype=np.uint8)
    for r, path, views, augment, scale in zip(
        batch["request"], batch["path"], batch["views"], batch["augment"], batch["scale"]
    ):
        try:
            blob = read_bytes(str(path))
            img = image_id(blob)
            pixels = crops(
                decode(blob), img, [int(v) for v in views], bool(augment), preprocess, float(scale)
            )
        except (OSError, ImageError) as exc:
            out["request"].append(r), out["image_id"].append(""), out["view"].append(-1)
            out["pixels"].append(blank), out["error"].append(_reason(exc))
            continue
        for v, p in zip(views, pixels):
            out["request"].append(r), out["image_id"].append(img), out["view"].append(int(v))
            out["pixels"].append(p), out["error"].append("")
    return {k: np.stack(v) if k == "pixels" else np.array(v) for k, v in out.items()}


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def encode_crops(backbone, cropped: dict, batch_size: int = ENCODE_BATCH) -> dict:
    """A `crop_batch` batch's features (columns request, image_id, view, feature, error), `batch_size`
    crops per forward pass; rows that failed to crop keep their error and a zero feature."""
    ok = np.flatnonzero(cropped["error"] == "")
    feats = np.zeros((len(cropped["error"]), backbone.width), dtype=np.float32)
    for start in range(0, len(ok), batch_size):
        rows = ok[start : start + batch_size]
        feats[rows] = backbone.encode_pixels(cropped["pixels"][rows])
    return dict(
        request=cropped["request"],
        image_id=cropped["image_id"],
        view=cropped["view"],
        feature=feats,
        error=cropped["error"],
    )


def request_batch(requests: list, first: int = 0) -> dict:
    """Requests (features.Request) as the columns `crop_batch` reads, numbered from `first`."""
    return dict(
        request=np.arange(first, first + len(requests)),
        path=[r.path for r in requests],
        views=[r.views for r in requests],
        augment=[r.augment for r in requests],
        scale=[r.scale for r in requests],
    )


def rows(encoded: dict) -> Iterator[dict]:
    """The rows of an `encode_crops` batch: request index, image_id, view, feature, error."""
    for r, img, v, f, e in zip(
        encoded["request"], encoded["image_id"], encoded["view"], encoded["feature"], encoded["error"]
    ):
        yield dict(request=int(r), image_id=str(img), view=int(v), feature=f, error=str(e))


def encode_in_process(backbone, requests: list, batch_size: int = ENCODE_BATCH) -> Iterator[dict]:
    """`crop_batch` then `encode_crops` in this process, `batch_size` images at a time: the rows the
    Ray pipeline yields for the same requests."""
    for start in range(0, len(requests), batch_size):
        cropped = crop_batch(request_batch(requests[start : start + batch_size], start), backbone.preprocess)
        yield from rows(encode_crops(backbone, cropped, batch_size))


def text_classifier(backbone, classnames: list[str], template: str | list[str]) -> np.ndarray:
    """L2-normalised class weights [C, D]; a list of templates is averaged (prompt ensemble)."""
    import torch

    templates = [template] if isinstance(template, str) else template
    weights = []
    for name in classnames:
        emb = backbone.encode_text([t.format(name) for t in templates])
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(0)
        weights.append(mean / mean.norm())
    return torch.stack(weights).numpy().astype(np.float32)


def zero_shot_accuracy(
    features: np.ndarray, labels: np.ndarray, text_weights: np.ndarray, logit_scale: float
) -> float:
    """Top-1 accuracy of the text classifier alone on single-view features [n, D] (or [n, 1, D]).

    In numpy, as F.normalize computes it: the sweep's driver computes it once per dataset and never
    imports torch."""
    if not len(labels):
        return float("nan")
    feats = _normalise(features.reshape(len(features), -1))
    return float(((logit_scale * feats @ _normalise(text_weights).T).argmax(-1) == labels).mean())


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class LocalEncoder:
    """Encodes in this process; loads the backbone on first use only."""

    backbone_name: str
    weights: str
    device: str | None = None
    _backbone: object = field(default=None, repr=False)

    @property
    def backbone(self):
        if self._backbone is None:
            from .backbone import load_backbone

            self._backbone = load_backbone(self.backbone_name, self.weights, self.device)
        return self._backbone

    def __call__(self, requests: list) -> Iterator[dict]:
        return encode_in_process(self.backbone, requests)

    def text(self, classnames: list[str], template: str | list[str]) -> tuple[np.ndarray, float]:
        return text_classifier(self.backbone, classnames, template), self.backbone.logit_scale
