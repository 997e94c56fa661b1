"""On images whose class is plain to see, a trained adapter beats zero-shot and chance by far."""
import numpy as np
import torch

from clip_adapter import CLIPAdapter, FeatureCache, TrainConfig, evaluate, few_shot, fit, zero_shot_accuracy
from clip_adapter.backbone import TINY
from clip_adapter.datasets import load, resolve
from clip_adapter.features import LocalEncoder


def test_adapter_learns_colours_with_a_random_backbone(colour_root, tiny, tmp_path):
    split = load(resolve("colours", colour_root)[0])
    train, val = few_shot(split, 8, seed=1)
    enc = LocalEncoder(TINY, "random")
    enc._backbone = tiny
    cache = FeatureCache(tmp_path, TINY, "random")
    tr = cache.images(train, 4, True, enc)
    te = cache.images(split.test, 1, False, enc)
    text, scale = cache.text(split.classnames, split.template, enc)

    torch.manual_seed(1)
    adapter = CLIPAdapter(torch.from_numpy(text), scale, alpha=0.6)
    # A random backbone's logit scale is 14, not CLIP's 100: a larger step makes up for it.
    losses = fit(adapter, tr.features, tr.labels, TrainConfig(epochs=100, lr=0.01), seed=1)
    acc = evaluate(adapter, te.features, te.labels)
    zs = zero_shot_accuracy(te.features, te.labels, text, scale)

    assert losses[-1] < 0.5 * losses[0]
    assert acc >= 0.9, (acc, zs)
    assert acc > zs + 0.25 and acc > 1 / 3 + 0.5


def test_training_is_reproducible_per_seed(colour_root, tiny, tmp_path):
    split = load(resolve("colours", colour_root)[0])
    enc = LocalEncoder(TINY, "random")
    enc._backbone = tiny
    feats = FeatureCache(tmp_path, TINY, "random").images(few_shot(split, 4, 1)[0], 2, True, enc)
    text = torch.randn(3, tiny.width)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        adapter = CLIPAdapter(text, 14.0, alpha=0.5)
        runs.append(fit(adapter, feats.features, feats.labels, TrainConfig(epochs=5), seed=3))
    assert runs[0] == runs[1]
    assert np.isfinite(runs[0]).all()
