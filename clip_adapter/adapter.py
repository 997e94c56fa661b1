"""CLIP-Adapter (Gao et al.): bottleneck MLPs on frozen CLIP features, blended back residually."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("visual", "text", "both")


class Bottleneck(nn.Sequential):
    """A(x) = ReLU(ReLU(x W1) W2), bias-free, D -> D/reduction -> D, as in the released code."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
                         nn.Linear(dim // reduction, dim, bias=False), nn.ReLU())


def cosine_logits(image_features: torch.Tensor, text_weights: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * F.normalize(image_features, dim=-1) @ F.normalize(text_weights, dim=-1).T


def zero_shot_logits(image_features: torch.Tensor, text_weights: torch.Tensor, scale: float) -> torch.Tensor:
    return cosine_logits(image_features, text_weights, scale)


class CLIPAdapter(nn.Module):
    """f* = alpha A_v(f) + (1 - alpha) f;  W* = beta A_t(W) + (1 - beta) W;  logits = s cos(f*, W*)."""

    def __init__(self, text_weights: torch.Tensor, logit_scale: float, alpha: float = 0.2,
                 beta: float = 0.2, variant: str = "visual", reduction: int = 4):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"adapter variant must be one of {VARIANTS}, got {variant!r}")
        for name, ratio in (("alpha", alpha), ("beta", beta)):
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {ratio}")
        dim = text_weights.shape[1]
        self.alpha, self.beta, self.variant, self.reduction = alpha, beta, variant, reduction
        self.logit_scale = float(logit_scale)
        self.register_buffer("text_weights", torch.as_tensor(text_weights, dtype=torch.float32).clone())
        self.visual = Bottleneck(dim, reduction) if variant in ("visual", "both") else None
        self.text = Bottleneck(dim, reduction) if variant in ("text", "both") else None

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        f, w = image_features, self.text_weights
        if self.visual is not None:
            f = self.alpha * self.visual(f) + (1 - self.alpha) * f
        if self.text is not None:
            w = self.beta * self.text(w) + (1 - self.beta) * w
        return cosine_logits(f, w, self.logit_scale)
