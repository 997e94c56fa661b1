"""Images as ca-flow reads them: content ids, safe decoding, and the seeded crops each view is made of."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterable

import numpy as np
from PIL import Image

from .errors import CaFlowError


class ImageError(CaFlowError, ValueError):
    """An image that cannot be read or decoded; the message says why."""


def image_id(blob: bytes) -> str:
    return hashlib.sha1(blob).hexdigest()


def decode(blob: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(blob))
            image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageError(f"refused: {exc}; downscale the image") from None
    except Exception as exc:  # PIL raises several types for truncated or foreign files
        raise ImageError(f"cannot decode image: {exc}") from None


def _view_seed(img_id: str, view: int) -> int:
    return int(img_id[:12], 16) ^ (view * 0x9E3779B1)


def crops(
    image: Image.Image,
    img_id: str,
    views: Iterable[int],
    augment: bool,
    preprocess,
    scale: float | None = None,
) -> np.ndarray:
    """uint8 crops [len(views), H, W, 3]; augmented view v of an image is the same on every machine.
    `scale`: the smallest crop of an augmented view (None: CoOp's)."""
    import torch

    out = []
    for v in views:
        if augment:
            torch.manual_seed(_view_seed(img_id, v))
        geometric = preprocess.geometric(augment) if scale is None else preprocess.geometric(augment, scale)
        out.append(np.asarray(geometric(image), dtype=np.uint8))
    return np.stack(out)
