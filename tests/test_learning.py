"""On images whose class is plain to see, a trained adapter beats zero-shot and chance by far."""

import numpy as np
import pytest
import torch

from clip_adapter import (
    CLIPAdapter,
    FeatureStore,
    LocalEncoder,
    TrainConfig,
    evaluate,
    few_shot,
    fit,
    zero_shot_accuracy,
)
from clip_adapter.backbone import TINY
from clip_adapter.datasets import load, resolve
from clip_adapter.methods import FewShot, make


@pytest.fixture(scope="module")
def colours(colour_root, tiny, tmp_path_factory):
    split = load(resolve("colours", colour_root)[0])
    enc = LocalEncoder(TINY, "random", _backbone=tiny)
    store = FeatureStore(tmp_path_factory.mktemp("store"), TINY, "random")
    text, scale = enc.text(split.classnames, split.template)
    return split, enc, store, text, scale


def test_adapter_learns_colours_with_a_random_backbone(colours):
    split, enc, store, text, scale = colours
    train, _ = few_shot(split, 8, seed=1)
    tr = store.images("colours", split.root, train, 4, True, enc)
    te = store.images("colours", split.root, split.test, 1, False, enc)

    torch.manual_seed(1)
    adapter = CLIPAdapter(torch.from_numpy(text), scale, alpha=0.6)
    # A random backbone's logit scale is 14, not CLIP's 100: a larger step makes up for it.
    losses = fit(adapter, tr.features, tr.labels, TrainConfig(epochs=100, lr=0.01), seed=1)
    acc = evaluate(adapter, te.features, te.labels)
    zs = zero_shot_accuracy(te.features, te.labels, text, scale)

    assert losses[-1] < 0.5 * losses[0]
    assert acc >= 0.9, (acc, zs)
    assert acc > zs + 0.25 and acc > 1 / 3 + 0.5


def test_training_is_reproducible_per_seed_and_differs_across_seeds(colours):
    """The method seeds itself: the caller's RNG state does not matter, the seed does."""
    split, enc, store, text, scale = colours
    train, val = few_shot(split, 4, 1)
    tr = store.images("colours", split.root, train, 2, True, enc)
    va = store.images("colours", split.root, val, 1, False, enc)
    data = FewShot(tr.features, tr.labels, va.features[:, 0], va.labels, text, scale)

    def run(seed, disturb):
        torch.manual_seed(disturb)  # whatever a reused Ray worker left behind
        np.random.seed(disturb)
        method = make("clip-adapter", text, scale, alpha=0.5, epochs=5)
        losses = method.fit(data, seed).losses
        return losses, [p.detach().clone() for p in method.parameters()]

    a, b, c = run(3, disturb=0), run(3, disturb=99), run(4, disturb=0)
    assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert a[0] != c[0] and not all(torch.equal(x, y) for x, y in zip(a[1], c[1]))
    assert np.isfinite(a[0]).all()


def test_written_out_sgd_steps_exactly_as_torch_optim_sgd():
    """train.SGD stands in for torch.optim.SGD (see its docstring): same momentum, weight decay and
    per-epoch lr changes give the same parameters, bit for bit, with a frozen parameter left alone."""
    from clip_adapter.train import SGD

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    twin = [p.detach().clone().requires_grad_() for p in net.parameters()]
    initial = [p.detach().clone() for p in twin]
    ours, theirs = (
        SGD(list(net.parameters()), 0.9, 5e-4),
        torch.optim.SGD(twin, lr=0.0, momentum=0.9, weight_decay=5e-4),
    )
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))

    def forward(params):
        w1, b1, w2, b2 = params
        return torch.nn.functional.cross_entropy(torch.relu(x @ w1.T + b1) @ w2.T + b2, y)

    for step in range(300):
        ours.lr = theirs.param_groups[0]["lr"] = 0.05 * (1 + step // 50)
        ours.zero_grad()
        forward(list(net.parameters())).backward()
        ours.step()
        theirs.zero_grad()
        forward(twin).backward()
        theirs.step()
    for a, b in zip(net.parameters(), twin):
        assert torch.equal(a, b)
    assert all(not torch.equal(a, b) for a, b in zip(twin, initial))  # both trained every parameter
