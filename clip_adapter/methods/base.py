"""The contract every few-shot method follows, and the registry its module registers into.

A method is fitted on a `FewShot`: the few-shot train features, the few-shot validation features
and the text classifier. It is never handed the test split, so every choice it makes (a ratio, an
epoch, a regularisation strength) is made on validation. It then maps image features to logits,
and saves itself as tensors (safetensors) plus a JSON-able config.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch


@dataclass
class FewShot:
    train: np.ndarray  # [n, views, D] raw image features, augmented views
    train_labels: np.ndarray  # [n]
    val: np.ndarray  # [m, D] raw image features, centre crop
    val_labels: np.ndarray  # [m]
    text: np.ndarray  # [C, D] L2-normalised text classifier
    logit_scale: float
    # (features, labels) a trained method chooses its epoch on, where it is not val: only the
    # released protocol sets it (Tip-Adapter-F's released code keeps its best test epoch).
    epoch_val: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class Fit:
    """What fitting found: chosen hyperparameters and, for trained methods, the loss per epoch."""

    chosen: dict = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


class Method(torch.nn.Module, abc.ABC):
    """Built as `make(name, text, logit_scale, **hparams)`; its state_dict is its artifact."""

    name: ClassVar[str]

    @abc.abstractmethod
    def fit(self, data: FewShot, seed: int) -> Fit:
        """Fit on train, choose on val, on the device the method's tensors are on."""

    @abc.abstractmethod
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [n, C] for raw image features [n, D]."""

    @abc.abstractmethod
    def config(self) -> dict:
        """The hparams that rebuild this method (tensor shapes included) before its state loads."""


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls
