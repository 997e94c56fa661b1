"""CLIP-Adapter as a method: the residual bottleneck adapter trained with CoOp's recipe."""
import torch

from ..adapter import CLIPAdapter
from ..train import TrainConfig, fit
from .base import Fit, Method, register


@register
class ClipAdapterMethod(Method):
    name = "clip-adapter"

    def __init__(self, text: torch.Tensor, logit_scale: float, alpha: float = 0.2, beta: float = 0.2,
                 variant: str = "visual", reduction: int = 4, epochs: int = 200, lr: float = 0.002,
                 batch_size: int = 32):
        super().__init__()
        self.adapter = CLIPAdapter(text, logit_scale, alpha, beta, variant, reduction)
        self.train_config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size)

    def fit(self, data, seed):
        # alpha and beta are grid axes of the sweep, chosen on val across trials, not in here.
        torch.manual_seed(seed)  # the adapter's initial weights, reproducible per trial
        a = self.adapter
        self.adapter = CLIPAdapter(a.text_weights, a.logit_scale, a.alpha, a.beta, a.variant,
                                   a.reduction).to(a.text_weights.device)
        return Fit(losses=fit(self.adapter, data.train, data.train_labels, self.train_config, seed))

    def forward(self, features):
        return self.adapter(features)

    def config(self):
        a, c = self.adapter, self.train_config
        return dict(alpha=a.alpha, beta=a.beta, variant=a.variant, reduction=a.reduction,
                    epochs=c.epochs, lr=c.lr, batch_size=c.batch_size)
