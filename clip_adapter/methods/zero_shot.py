"""Zero-shot CLIP: the text classifier alone, nothing to fit."""

import torch

from ..adapter import zero_shot_logits
from .base import Fit, Method, register


@register
class ZeroShot(Method):
    name = "zero-shot"

    def __init__(self, text: torch.Tensor, logit_scale: float):
        super().__init__()
        self.logit_scale = logit_scale
        self.register_buffer("text", text.clone())

    def fit(self, data, seed):
        return Fit()

    def forward(self, features):
        return zero_shot_logits(features, self.text, self.logit_scale)

    def config(self):
        return {}
