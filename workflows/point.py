"""A trial point: one grid point of a sweep, from the grid to its run and back.

Frozen: the same point is a Tune trial's config, the recorder's record and a row of the results
table, and none of them may change it. Its key hashes everything that changes the trial's result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from .names import POINT_PARAMS

FEW_SHOT = "few-shot"
# Where a few-shot point makes its choices (clip_adapter.protocol.selection for the released one).
FEW_SHOT_SELECT = {"val": "few-shot", "epoch": "val"}


@dataclass(frozen=True)
class TrialPoint:
    dataset: str
    method: str
    shots: int
    seed: int
    hparams: dict = field(default_factory=dict)  # the method's keyword arguments (clip_adapter.methods.make)
    backbone: str = ""
    weights: str = ""  # the pretrained tag or weights file, as given
    weights_id: str = ""  # what the weights are (clip_adapter.backbone.weights_identity)
    views: int = 1  # augmented views per train image
    protocol: str = FEW_SHOT
    select: dict | None = None  # where the released protocol makes its choices; None: few-shot
    key: str = ""
    name: str = ""

    @classmethod
    def keyed(cls, **fields) -> TrialPoint:
        """The point with its key and its run's name."""
        point = cls(**fields)
        key = hashlib.sha1(json.dumps(point.identity(), sort_keys=True).encode()).hexdigest()[:16]
        ratios = [
            f"{k}{v:g}" if isinstance(v, float) else str(v)
            for k, v in point.hparams.items()
            if k in ("variant", "alpha", "beta")
        ]
        name = "-".join(
            [point.dataset, point.method, f"{point.shots}shot", f"seed{point.seed}", *ratios]
            + ([point.protocol] if point.protocol != FEW_SHOT else [])
        )
        return cls(**fields, key=key, name=name)

    def identity(self) -> dict:
        """What the key hashes: few-shot points leave the protocol out, so their keys are the keys
        from before protocols (resume finds their runs)."""
        out = dict(self.params(), hparams=self.hparams)
        if self.protocol != FEW_SHOT:
            out.update(protocol=self.protocol, select=self.select)
        return out

    def params(self) -> dict:
        """The point's own fields as its run logs them."""
        return {k: getattr(self, k) for k in POINT_PARAMS}

    @property
    def alpha(self) -> float:
        return self.hparams.get("alpha", float("nan"))

    @property
    def beta(self) -> float:
        return self.hparams.get("beta", float("nan"))

    @property
    def variant(self) -> str:
        return self.hparams.get("variant", "")

    @property
    def selects(self) -> dict:
        return self.select or FEW_SHOT_SELECT


Pack = list[TrialPoint]  # the points one Tune trial trains (grid.packs): one, or CLIP-Adapter's alike points
