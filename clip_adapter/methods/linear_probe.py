"""Linear probe: logistic regression on L2-normalised image features, C chosen on val."""

import numpy as np
import torch
import torch.nn.functional as F

from ..train import seed_everything
from .base import Fit, Method, register

C_GRID = tuple(10.0**k for k in range(-2, 5))  # CoOp's probe searches C over decades too


def _norm(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@register
class LinearProbe(Method):
    name = "linear-probe"

    def __init__(self, text: torch.Tensor, logit_scale: float, C: float | None = None):
        super().__init__()
        self.C = C
        classes, dim = text.shape
        self.register_buffer("weight", torch.zeros(classes, dim))
        self.register_buffer("bias", torch.zeros(classes))

    def fit(self, data, seed):
        from sklearn.linear_model import LogisticRegression  # heavy import, only where it is used

        seed_everything(seed)
        x = _norm(data.train.reshape(-1, data.train.shape[-1]))  # every cached view is a sample
        y = np.repeat(data.train_labels, data.train.shape[1])
        best = None
        for c in [self.C] if self.C else C_GRID:
            clf = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x, y)
            weight = np.zeros(tuple(self.weight.shape), dtype=np.float32)
            bias = np.full(self.bias.shape, -1e4, dtype=np.float32)  # classes absent from train
            weight[clf.classes_] = (
                clf.coef_ if len(clf.classes_) > 2 else np.stack([-clf.coef_[0], clf.coef_[0]])
            )
            bias[clf.classes_] = (
                clf.intercept_ if len(clf.classes_) > 2 else [-clf.intercept_[0], clf.intercept_[0]]
            )
            val = (
                float(((_norm(data.val) @ weight.T + bias).argmax(-1) == data.val_labels).mean())
                if len(data.val_labels)
                else 0.0
            )
            if best is None or val > best[0]:  # ties keep the stronger regularisation (smaller C)
                best = (val, c, weight, bias)
        _, self.C, weight, bias = best
        self.weight.copy_(torch.from_numpy(weight))
        self.bias.copy_(torch.from_numpy(bias))
        return Fit(chosen={"C": self.C})

    def forward(self, features):
        return F.normalize(features, dim=-1) @ self.weight.T + self.bias

    def config(self):
        return {"C": self.C}
