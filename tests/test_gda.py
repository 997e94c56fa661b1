"""GDA against its released code (mrflogs/ICLR24 560fe21, main_few_shots.py), written out here.

`released_run` restates run() (main_few_shots.py:38-83) from reading it, on features already
encoded: it shares no code with clip_adapter.methods.gda.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_adapter.methods import FewShot, make

C, D = 4, 12


def released_run(vecs, labels, val_features, val_labels, clip_weights, logit_scale=100.0):
    """main_few_shots.py:56-79 with vecs [N, D] normalised (lines 48-49), clip_weights [D, C].

    Returns (best_alpha, W [D, C], b [C]). The released loop is copied line for line; only .cuda()
    is dropped and float64 asked for, as ca-flow estimates in float64.
    """
    vecs, val_features, clip_weights = vecs.double(), val_features.double(), clip_weights.double()
    mus = torch.cat([vecs[labels == i].mean(dim=0, keepdim=True) for i in range(clip_weights.shape[1])])
    center_vecs = torch.cat([vecs[labels == i] - mus[i].unsqueeze(0) for i in range(clip_weights.shape[1])])
    cov_inv = center_vecs.shape[1] * torch.linalg.pinv(
        (center_vecs.shape[0] - 1) * center_vecs.T.cov()
        + center_vecs.T.cov().trace() * torch.eye(center_vecs.shape[1], dtype=torch.float64)
    )
    ps = torch.ones(clip_weights.shape[1], dtype=torch.float64) * 1.0 / clip_weights.shape[1]
    W = torch.einsum("nd, dc -> cn", mus, cov_inv)
    b = ps.log() - torch.einsum("nd, dc, nc -> n", mus, cov_inv, mus) / 2
    best_val_acc = 0
    best_alpha = 0.1
    for alpha in [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0]:
        val_logits = logit_scale * val_features @ clip_weights + alpha * (val_features @ W + b)
        acc = 100 * float((val_logits.argmax(-1) == val_labels).sum()) / len(val_labels)  # cls_acc
        if acc > best_val_acc:
            best_val_acc = acc
            best_alpha = alpha
    return best_alpha, W, b


def few_shot(seed=0, views=3, text_noise=2.5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(C, D))

    def draw(n, v):
        y = np.repeat(np.arange(C), n)
        return (centers[y][:, None, :] + 0.8 * rng.normal(size=(len(y), v, D))).astype(np.float32), y

    train, ytrain = draw(5, views)
    val, yval = draw(6, 1)
    text = F.normalize(
        torch.from_numpy(centers + text_noise * rng.normal(size=centers.shape)).float(), dim=-1
    )
    test, ytest = draw(30, 1)
    return FewShot(train, ytrain, val[:, 0], yval, text.numpy(), 100.0), test[:, 0], ytest


def released_inputs(data):
    """The released layout: every view a sample, normalised; val normalised (pre_load_features)."""
    vecs = F.normalize(torch.from_numpy(data.train.reshape(-1, D)), dim=-1)
    labels = torch.from_numpy(np.repeat(data.train_labels, data.train.shape[1]))
    val = F.normalize(torch.from_numpy(data.val), dim=-1)
    return vecs, labels, val, torch.from_numpy(data.val_labels), torch.from_numpy(data.text).T


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gda_equals_the_released_run_on_random_features(seed):
    data, test, _ = few_shot(seed)
    alpha, W, b = released_run(*released_inputs(data))
    method = make("gda", data.text, data.logit_scale)
    fitted = method.fit(data, seed=1)
    assert fitted.chosen == {"alpha": alpha} and method.alpha == alpha
    torch.testing.assert_close(method.weight, W.T.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(method.bias, b.float(), rtol=1e-5, atol=1e-4)
    # The released test logits (main_few_shots.py:80) at the chosen alpha.
    test = torch.from_numpy(test)
    f = F.normalize(test, dim=-1).double()
    expected = 100.0 * f @ torch.from_numpy(data.text).T.double() + alpha * (f @ W + b)
    with torch.no_grad():
        torch.testing.assert_close(method(test).double(), expected, rtol=1e-4, atol=1e-3)


def test_alpha_grid_is_the_released_list_and_ties_keep_the_earlier_alpha():
    from clip_adapter.methods.gda import ALPHAS, INITIAL_ALPHA, search

    assert ALPHAS == (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0)  # main_few_shots.py:70
    assert INITIAL_ALPHA == 0.1  # main_few_shots.py:69
    labels = torch.tensor([0, 1])
    clip = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # zero-shot gets one of two right
    gda = torch.tensor([[0.0, 0.0], [0.0, 0.5]])  # 1.0 * 0.5 < 1: only alpha >= 10 flips the second
    assert search(clip, gda, labels) == 10.0  # 10 and 100 tie at 2 right: the earlier wins
    # Nothing right at any alpha: the released initial 0.1 stands.
    assert search(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.tensor([0])) == 0.1


def test_gda_beats_zero_shot_where_the_text_is_poor():
    data, test, ytest = few_shot(5, text_noise=4.0)
    method = make("gda", data.text, data.logit_scale)
    method.fit(data, seed=1)
    zero_shot = make("zero-shot", data.text, data.logit_scale)
    with torch.no_grad():
        x = torch.from_numpy(test)
        acc = float((method(x).argmax(-1).numpy() == ytest).mean())
        zs = float((zero_shot(x).argmax(-1).numpy() == ytest).mean())
    assert acc > zs + 0.2, (acc, zs)
