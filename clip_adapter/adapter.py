"""CLIP-Adapter (Gao et al.): bottleneck MLPs on frozen CLIP features, blended back residually."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("visual", "text", "both")


class Bottleneck(nn.Sequential):
    """A(x) = ReLU(ReLU(x W1) W2), bias-free, D -> D/reduction -> D, as in the released code."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(),
        )


def cosine_logits(image_features: torch.Tensor, text_weights: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * F.normalize(image_features, dim=-1) @ F.normalize(text_weights, dim=-1).T


def zero_shot_logits(image_features: torch.Tensor, text_weights: torch.Tensor, scale: float) -> torch.Tensor:
    return cosine_logits(image_features, text_weights, scale)


class CLIPAdapter(nn.Module):
    """f* = alpha A_v(f) + (1 - alpha) f;  W* = beta A_t(W) + (1 - beta) W;  logits = s cos(f*, W*)."""

    def __init__(
        self,
        text_weights: torch.Tensor,
        logit_scale: float,
        alpha: float = 0.2,
        beta: float = 0.2,
        variant: str = "visual",
        reduction: int = 4,
    ):
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


class StackedCLIPAdapter(nn.Module):
    """K CLIP-Adapters of one variant, one per (alpha, beta), as stacked weights [K, out, in]: one batched
    matmul per layer instead of K. Logits are [K, n, C]; member k computes what `members[k]` computes."""

    def __init__(self, members: list[CLIPAdapter]):
        super().__init__()
        first = members[0]
        if any((m.variant, m.reduction) != (first.variant, first.reduction) for m in members):
            raise ValueError("stacked adapters must share their variant and reduction")
        self.variant, self.reduction, self.logit_scale = first.variant, first.reduction, first.logit_scale
        self.register_buffer("text_weights", first.text_weights.clone())
        self.register_buffer("alpha", torch.tensor([float(m.alpha) for m in members]).view(-1, 1, 1))
        self.register_buffer("beta", torch.tensor([float(m.beta) for m in members]).view(-1, 1, 1))
        for branch in ("visual", "text"):
            if getattr(first, branch) is not None:
                stacked = [
                    torch.stack([getattr(m, branch)[i].weight.detach() for m in members]) for i in (0, 2)
                ]
                setattr(self, f"{branch}_down", nn.Parameter(stacked[0].clone()))
                setattr(self, f"{branch}_up", nn.Parameter(stacked[1].clone()))

    @staticmethod
    def _bottleneck(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # x [K, n, D] (or [n, D], shared by all members); nn.Linear's weights are [out, in].
        x = x.expand(len(down), *x.shape[-2:])
        return F.relu(torch.bmm(F.relu(torch.bmm(x, down.transpose(1, 2))), up.transpose(1, 2)))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        f, w = image_features.unsqueeze(0), self.text_weights.unsqueeze(0)
        if self.variant in ("visual", "both"):
            f = self.alpha * self._bottleneck(f, self.visual_down, self.visual_up) + (1 - self.alpha) * f
        if self.variant in ("text", "both"):
            w = self.beta * self._bottleneck(w, self.text_down, self.text_up) + (1 - self.beta) * w
        return self.logit_scale * torch.matmul(F.normalize(f, dim=-1), F.normalize(w, dim=-1).transpose(1, 2))

    @torch.no_grad()
    def unstack(self, members: list[CLIPAdapter]) -> None:
        """Copy member k's trained weights into `members[k]`."""
        for branch in ("visual", "text"):
            if getattr(members[0], branch) is not None:
                for k, m in enumerate(members):
                    getattr(m, branch)[0].weight.copy_(getattr(self, f"{branch}_down")[k])
                    getattr(m, branch)[2].weight.copy_(getattr(self, f"{branch}_up")[k])
