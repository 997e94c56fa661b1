"""Training and evaluation of an adapter on cached features (CoOp's recipe by default)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .adapter import CLIPAdapter, StackedCLIPAdapter
from .protocol import epochs_for_shots  # noqa: F401  (the library's API: clip_adapter.epochs_for_shots)


@dataclass
class TrainConfig:
    epochs: int = 200
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """Constant warm-up, then cosine over all epochs, as CoOp's ConstantWarmupScheduler: the cosine
    restarts its count after the warm-up, so the first epoch after it runs at the full lr."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


def seed_everything(seed: int) -> None:
    # Reused Ray actors carry RNG state from the previous trial: reseed at every start.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SGD:
    """torch.optim.SGD's update (momentum, weight decay; no dampening, no Nesterov), step for step.

    Written out because a process's first torch.optim step imports torch._dynamo (2-3 s on 2 CPUs),
    a cost every fresh trial actor would pay before its first trial.
    """

    def __init__(self, params: list[torch.Tensor], momentum: float, weight_decay: float):
        self.params, self.momentum, self.weight_decay = params, momentum, weight_decay
        self.lr = 0.0
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = p.grad.add(p, alpha=self.weight_decay)
            buf = self.buffers[i]
            self.buffers[i] = d if buf is None else buf.mul_(self.momentum).add_(d)
            p.add_(self.buffers[i], alpha=-self.lr)


def fit(
    adapter: CLIPAdapter | StackedCLIPAdapter,
    features: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    seed: int,
) -> list:
    """Train on [n, views, D] features; each epoch draws one cached view per image. Loss per epoch.

    A stacked adapter (logits [K, n, C]) trains its K members on the one batch stream; the loss per
    epoch is then a list of K, one per member, and the step minimises their sum: each member's
    gradient is its own loss's. Runs where the adapter's parameters are (move it to a GPU first).
    """
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    device = adapter.text_weights.device
    feats = torch.from_numpy(features).to(device)
    targets = torch.from_numpy(labels).to(device)
    opt = SGD([p for p in adapter.parameters() if p.requires_grad], cfg.momentum, cfg.weight_decay)
    n, views = feats.shape[:2]
    losses = []
    adapter.train()
    for epoch in range(cfg.epochs):
        opt.lr = lr_at(epoch, cfg)
        x = feats[torch.arange(n, device=device), torch.from_numpy(rng.integers(views, size=n)).to(device)]
        order = torch.from_numpy(rng.permutation(n)).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = _loss(adapter(x[idx]), targets[idx])
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            total = total + loss.detach() * len(idx)
        losses.append((total.double() / n).tolist())  # one device sync per epoch, not per step
    adapter.eval()
    return losses


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: a scalar for logits [n, C], one per member for stacked logits [K, n, C]."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(
        logits.permute(1, 2, 0), targets[:, None].expand(-1, len(logits)), reduction="none"
    ).mean(0)


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((logits.argmax(-1).cpu().numpy() == labels).mean())


@torch.no_grad()
def evaluate(adapter: torch.nn.Module, features: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy on single-view features [n, D] (or [n, 1, D])."""
    feats = torch.from_numpy(features.reshape(len(features), -1)).to(next(adapter.buffers()).device)
    return accuracy(adapter(feats), labels)
