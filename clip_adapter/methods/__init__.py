"""Few-shot methods behind one contract (`base.Method`), registered by name as peft registers its tuners.

Each method lives in its own module, which registers its class when imported. Modules load on first
use: listing and validating method names needs no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import import_module

# name -> the module that registers it, in the order tables show them.
_MODULES = {
    "clip-adapter": "clip_adapter",
    "zero-shot": "zero_shot",
    "linear-probe": "linear_probe",
    "tip-adapter": "tip_adapter",
    "tip-adapter-f": "tip_adapter",
    "gda": "gda",
}
NAMES = tuple(_MODULES)
# Methods that fit nothing: one trial per (dataset, seed) is enough, and its figure stands in every
# shots column. Said here, not on the class, so a sweep can plan its grid without torch.
UNTRAINED = frozenset({"zero-shot"})


def check(names: Iterable[str], where: str = "") -> None:
    """Raise ValueError naming the first of `names` that is no method's; `where` says where the names
    came from, as the caller spells it (the command line: " in --methods")."""
    for name in names:
        if name not in _MODULES:
            raise ValueError(f"unknown method {name!r}{where}; choose from {', '.join(NAMES)}")


def get(name: str):
    """The registered class of method `name`."""
    check([name])
    import_module(f".{_MODULES[name]}", __name__)
    from .base import METHODS

    return METHODS[name]


def make(name: str, text, logit_scale: float, **hparams):
    import torch

    return get(name)(torch.as_tensor(text, dtype=torch.float32), float(logit_scale), **hparams)


def trains(name: str) -> bool:
    check([name])
    return name not in UNTRAINED


def __getattr__(name: str):
    if name == "METHODS":  # every method, loaded, in NAMES' order whatever order they were imported in
        return {method: get(method) for method in NAMES}
    if name in ("FewShot", "Fit", "Method", "register"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
