"""Tip-Adapter (training-free cache model) and Tip-Adapter-F (trainable cache keys).

logits = s * f.W + alpha * exp(-beta * (1 - f.keys)) . values, with f and keys L2-normalised,
values the one-hot labels of the keys. alpha weights the cache, beta sets its sharpness; both, and
Tip-Adapter-F's epoch, are chosen on the few-shot validation split (the released code picks the
epoch on test).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..adapter import zero_shot_logits
from ..train import seed_everything
from . import Fit, Method, register

# Tip-Adapter's search: search_scale [7, 3], search_step [200, 20].
BETAS = tuple(0.1 + i * (7 - 0.1) / 200 for i in range(200))
ALPHAS = tuple(0.1 + i * (3 - 0.1) / 20 for i in range(20))


def cache_keys(train: np.ndarray) -> torch.Tensor:
    """Per image, the mean of its L2-normalised augmented views, normalised again (as Tip-Adapter)."""
    views = F.normalize(torch.from_numpy(train), dim=-1)
    return F.normalize(views.mean(1), dim=-1)


def search(clip: torch.Tensor, affinity: torch.Tensor, values: torch.Tensor, labels: torch.Tensor,
           alpha: float, beta: float) -> tuple[float, float]:
    """The (alpha, beta) with the best val accuracy; ties keep the defaults, then the smallest."""
    def acc(a, b):
        return (clip + a * torch.exp(-b * (1 - affinity)) @ values).argmax(-1).eq(labels).float().mean().item()

    best = (acc(alpha, beta), alpha, beta)
    for b in BETAS:
        cache = torch.exp(-b * (1 - affinity)) @ values
        for a in ALPHAS:
            score = (clip + a * cache).argmax(-1).eq(labels).float().mean().item()
            if score > best[0]:
                best = (score, a, b)
    return best[1], best[2]


@register
class TipAdapter(Method):
    name = "tip-adapter"

    def __init__(self, text: torch.Tensor, logit_scale: float, alpha: float = 1.0, beta: float = 1.0,
                 n_keys: int = 0, search: bool = True):
        super().__init__()
        self.alpha, self.beta, self.logit_scale, self.search = alpha, beta, logit_scale, search
        classes, dim = text.shape
        self.register_buffer("text", text.clone())
        self.register_buffer("keys", torch.zeros(n_keys, dim))
        self.register_buffer("values", torch.zeros(n_keys, classes))

    def affinity(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f, dim=-1) @ self.keys.T

    def forward(self, features):
        cache = torch.exp(-self.beta * (1 - self.affinity(features))) @ self.values
        return zero_shot_logits(features, self.text, self.logit_scale) + self.alpha * cache

    def _build_cache(self, data) -> None:
        device = self.text.device
        self.keys = cache_keys(data.train).to(device)
        self.values = F.one_hot(torch.from_numpy(data.train_labels), self.text.shape[0]).float().to(device)

    def _search(self, data) -> dict:
        if self.search and len(data.val_labels):
            with torch.no_grad():
                val = torch.from_numpy(data.val).to(self.text.device)
                self.alpha, self.beta = search(zero_shot_logits(val, self.text, self.logit_scale),
                                               self.affinity(val), self.values,
                                               torch.from_numpy(data.val_labels).to(val.device),
                                               self.alpha, self.beta)
        return {"alpha": self.alpha, "beta": self.beta}

    def fit(self, data, seed):
        self._build_cache(data)
        return Fit(chosen=self._search(data))

    def config(self):
        return dict(alpha=self.alpha, beta=self.beta, n_keys=len(self.keys), search=self.search)


@register
class TipAdapterF(TipAdapter):
    """The cache keys become trainable, initialised from the cache; AdamW, cosine, batch 256."""
    name = "tip-adapter-f"

    def __init__(self, text, logit_scale, alpha=1.0, beta=1.0, n_keys=0, search=True,
                 epochs: int = 20, lr: float = 0.001, batch_size: int = 256):
        super().__init__(text, logit_scale, alpha, beta, n_keys, search)
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def fit(self, data, seed):
        seed_everything(seed)
        self._build_cache(data)
        device = self.text.device
        keys = torch.nn.Parameter(self.keys.clone())
        opt = torch.optim.AdamW([keys], lr=self.lr, eps=1e-4)
        steps = self.epochs * math.ceil(len(data.train) / self.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        feats = torch.from_numpy(data.train).to(device)
        labels = torch.from_numpy(data.train_labels).to(device)
        val = torch.from_numpy(data.val).to(device)
        val_labels = torch.from_numpy(data.val_labels).to(device)
        rng = np.random.default_rng(seed)
        n, views = feats.shape[:2]
        losses, best = [], (-1.0, 0, self.keys.clone())
        for epoch in range(self.epochs):
            x = feats[torch.arange(n, device=device), torch.from_numpy(rng.integers(views, size=n)).to(device)]
            total = torch.zeros((), device=device)
            for idx in torch.from_numpy(rng.permutation(n)).to(device).split(self.batch_size):
                f = F.normalize(x[idx], dim=-1)
                cache = torch.exp(-self.beta * (1 - f @ keys.T)) @ self.values
                logits = self.logit_scale * f @ self.text.T + self.alpha * cache
                loss = F.cross_entropy(logits, labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.detach() * len(idx)
            losses.append(float(total) / n)
            with torch.no_grad():  # the epoch is chosen on val, never on test
                self.keys = keys.detach().clone()
                acc = self(val).argmax(-1).eq(val_labels).float().mean().item() if len(val_labels) else 0.0
                if acc > best[0]:
                    best = (acc, epoch, self.keys)
        self.keys = best[2]
        chosen = self._search(data)
        return Fit(chosen={**chosen, "epoch": best[1]}, losses=losses)

    def config(self):
        return {**super().config(), "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size}
