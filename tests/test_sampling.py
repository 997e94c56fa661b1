import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from clip_adapter.datasets import DatasetSplits, Item, few_shot


def split(train_per_class=(20, 20, 3), val_per_class=(10, 2, 10)):
    train = [Item(f"/t/{c}/{i}.jpg", c) for c, n in enumerate(train_per_class) for i in range(n)]
    val = [Item(f"/v/{c}/{i}.jpg", c) for c, n in enumerate(val_per_class) for i in range(n)]
    test = [Item(f"/x/{c}/{i}.jpg", c) for c in range(3) for i in range(5)]
    return DatasetSplits("s", "imagefolder", Path("/"), ["a", "b", "c"], "{}", train, val, test)


def dassl_reference(items, k):
    """Dassl's generate_fewshot_dataset, on the global `random` as CoOp seeds it."""
    tracker = defaultdict(list)
    for item in items:
        tracker[item.label].append(item)
    out = []
    for group in tracker.values():
        out.extend(random.sample(group, k) if len(group) >= k else group)
    return out


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_counts_k_and_min_k_4(shots):
    train, val = few_shot(split(), shots, seed=1)
    assert Counter(i.label for i in train) == {0: shots, 1: shots, 2: min(shots, 3)}  # class 2 has 3
    assert Counter(i.label for i in val) == {0: min(shots, 4), 1: min(shots, 4, 2), 2: min(shots, 4)}


def test_deterministic_per_seed_and_different_across_seeds():
    s = split()
    assert few_shot(s, 4, 1) == few_shot(s, 4, 1)
    assert few_shot(s, 4, 1)[0] != few_shot(s, 4, 2)[0]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_coop_dassl_sampling(seed):
    s = split()
    random.seed(seed)
    expected_train = dassl_reference(s.train, 8)
    expected_val = dassl_reference(s.val, 4)
    assert few_shot(s, 8, seed) == (expected_train, expected_val)


def test_test_split_is_untouched_and_shots_must_be_positive():
    s = split()
    before = list(s.test)
    few_shot(s, 2, 1)
    assert s.test == before
    with pytest.raises(ValueError, match="shots"):
        few_shot(s, 0, 1)
