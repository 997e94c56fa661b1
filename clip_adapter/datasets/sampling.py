"""Few-shot subsets exactly as CoOp/Dassl draw them."""

from __future__ import annotations

import random
from collections import defaultdict

from . import DatasetSplits, Item


def _per_class(items: list[Item], k: int, rng: random.Random) -> list[Item]:
    by_label: dict[int, list[Item]] = defaultdict(list)  # first-seen label order, as Dassl
    for item in items:
        by_label[item.label].append(item)
    out: list[Item] = []
    for group in by_label.values():
        out += rng.sample(group, k) if len(group) >= k else group
    return out


def few_shot(split: DatasetSplits, shots: int, seed: int) -> tuple[list[Item], list[Item]]:
    """K per class for train, then min(K, 4) per class for val, from one stream seeded by `seed`.

    Dassl seeds `random` once, samples train then val with random.sample; a class with fewer
    than K images keeps them all. Test is never sampled. A split with `val_from_train` (ImageNet,
    whose official val is our test) draws val from the train images not chosen as shots.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    rng = random.Random(seed)
    train = _per_class(split.train, shots, rng)
    if split.val_from_train:
        chosen = set(train)
        return train, _per_class([i for i in split.train if i not in chosen], min(shots, 4), rng)
    return train, _per_class(split.val, min(shots, 4), rng)
