"""CLIP-Adapter as a method: the residual bottleneck adapter trained with CoOp's recipe."""

import torch

from ..adapter import CLIPAdapter, StackedCLIPAdapter
from ..train import TrainConfig, fit
from .base import Fit, Method, register


@register
class ClipAdapterMethod(Method):
    name = "clip-adapter"

    def __init__(
        self,
        text: torch.Tensor,
        logit_scale: float,
        alpha: float = 0.2,
        beta: float = 0.2,
        variant: str = "visual",
        reduction: int = 4,
        epochs: int = 200,
        lr: float = 0.002,
        batch_size: int = 32,
    ):
        super().__init__()
        self.adapter = CLIPAdapter(text, logit_scale, alpha, beta, variant, reduction)
        self.train_config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size)

    def fit(self, data, seed):
        # alpha and beta are grid axes of the sweep, chosen on val across trials, not in here.
        self._init(seed)
        return Fit(losses=fit(self.adapter, data.train, data.train_labels, self.train_config, seed))

    def _init(self, seed: int) -> None:
        torch.manual_seed(seed)  # the adapter's initial weights, reproducible per trial
        a = self.adapter
        self.adapter = CLIPAdapter(a.text_weights, a.logit_scale, a.alpha, a.beta, a.variant, a.reduction).to(
            a.text_weights.device
        )

    def forward(self, features):
        return self.adapter(features)

    def config(self):
        a, c = self.adapter, self.train_config
        return dict(
            alpha=a.alpha,
            beta=a.beta,
            variant=a.variant,
            reduction=a.reduction,
            epochs=c.epochs,
            lr=c.lr,
            batch_size=c.batch_size,
        )


def fit_packed(methods: list[ClipAdapterMethod], data, seed: int) -> list[Fit]:
    """Fit K CLIP-Adapters that differ only in alpha and beta as one stacked model on one batch stream.

    Each ends as `method.fit(data, seed)` would leave it (within float rounding): the same initial
    weights (each drawn as its own fit draws them), the same views and batches (drawn from the seed
    alone), its own gradient, momentum and weight decay, its own loss per epoch.
    """
    shared = [(m.adapter.variant, m.adapter.reduction, m.train_config) for m in methods]
    if any(s != shared[0] for s in shared):
        raise ValueError(
            f"packed CLIP-Adapters must share variant, reduction and training config; got {shared}"
        )
    for m in methods:
        m._init(seed)
    stacked = StackedCLIPAdapter([m.adapter for m in methods])
    per_epoch = fit(stacked, data.train, data.train_labels, methods[0].train_config, seed)
    stacked.unstack([m.adapter for m in methods])
    return [Fit(losses=[epoch[k] for epoch in per_epoch]) for k in range(len(methods))]
