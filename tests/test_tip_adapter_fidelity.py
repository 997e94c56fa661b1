"""Pins the README's Protocol section: where ca-flow follows the released code of Tip-Adapter,
CLIP-Adapter and CoOp/Dassl, and where it departs on purpose.

The references written here (`released_search_hp`, `dassl_lr_per_epoch`) restate the released
code's logic from reading it (gaopengcuhk/Tip-Adapter utils.py, KaiyangZhou/Dassl.pytorch
dassl/optim/lr_scheduler.py); they share no code with the product.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_adapter.methods import FewShot, make
from clip_adapter.methods.tip_adapter import ALPHAS, BETAS, cache_keys, search

C, D = 3, 8


def released_search_hp(
    features,
    cache_keys_t,
    cache_values,
    labels,
    clip_weights,
    logit_scale=100.0,
    search_scale=(7, 3),
    search_step=(200, 20),
):
    """Tip-Adapter's search_hp as released: beta outer, alpha inner, best from 0, strict '>'.

    Takes the released layouts: normalised features [n, D], keys [D, N], values [N, C], weights [D, C].
    Returns (alpha, beta) (the released function returns (beta, alpha)).
    """
    beta_list = [i * (search_scale[0] - 0.1) / search_step[0] + 0.1 for i in range(search_step[0])]
    alpha_list = [i * (search_scale[1] - 0.1) / search_step[1] + 0.1 for i in range(search_step[1])]
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in beta_list:
        for alpha in alpha_list:
            affinity = features @ cache_keys_t
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
            clip_logits = logit_scale * features @ clip_weights
            tip_logits = clip_logits + cache_logits * alpha
            acc = 100 * float((tip_logits.argmax(-1) == labels).sum()) / len(labels)  # cls_acc, top-1
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_alpha, best_beta


# -- Tip-Adapter: cache keys ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uneven_views():
    """6 images x 4 views whose raw norms differ by up to 40x, as CLIP's raw norms vary per view."""
    rng = np.random.default_rng(3)
    directions = rng.normal(size=(6, 4, D))
    norms = rng.uniform(0.5, 20.0, size=(6, 4, 1))
    return (directions * norms).astype(np.float32), np.repeat(np.arange(C), 2)


def test_cache_keys_are_the_mean_of_raw_views_normalised_once(uneven_views):
    views, _ = uneven_views
    mean = views.mean(axis=1)
    expected = mean / np.linalg.norm(mean, axis=-1, keepdims=True)  # build_cache_model: mean, then /= norm
    np.testing.assert_allclose(cache_keys(views).numpy(), expected, rtol=1e-5, atol=1e-6)
    # The old keys (normalise each view, average, normalise again) are far from these.
    unit = views / np.linalg.norm(views, axis=-1, keepdims=True)
    normalise_first = unit.mean(1) / np.linalg.norm(unit.mean(1), axis=-1, keepdims=True)
    assert np.abs(normalise_first - expected).max() > 0.1


@pytest.mark.parametrize("name", ["tip-adapter", "tip-adapter-f"])
def test_both_methods_build_their_cache_from_raw_views(uneven_views, name):
    views, labels = uneven_views
    rng = np.random.default_rng(4)
    text = F.normalize(torch.from_numpy(rng.normal(size=(C, D)).astype(np.float32)), dim=-1).numpy()
    data = FewShot(views, labels, rng.normal(size=(6, D)).astype(np.float32), labels, text, 100.0)
    # lr 0: Tip-Adapter-F's trained keys stay its initial cache (AdamW moves nothing at lr 0).
    method = make(
        name, text, 100.0, search=False, **({"lr": 0.0, "epochs": 1} if name == "tip-adapter-f" else {})
    )
    method.fit(data, seed=1)
    mean = views.mean(axis=1)
    np.testing.assert_allclose(
        method.keys.numpy(), mean / np.linalg.norm(mean, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(method.values, F.one_hot(torch.from_numpy(labels), C).float())


# -- Tip-Adapter: the (alpha, beta) search -----------------------------------------------------------


def test_search_grid_is_the_released_lists():
    assert list(BETAS) == [i * (7 - 0.1) / 200 + 0.1 for i in range(200)]
    assert list(ALPHAS) == [i * (3 - 0.1) / 20 + 0.1 for i in range(20)]
    assert (BETAS[0], ALPHAS[0], len(BETAS), len(ALPHAS)) == (0.1, 0.1, 200, 20)


def test_search_returns_the_first_best_point_beta_outer_alpha_inner():
    """One val image, zero-shot wrong by 0.3; the cache rescues it once alpha * (1 - exp(-beta/2)) > 0.3.

    3,293 of the 4,000 grid points tie at 100%, the defaults (1, 1) among them: the old search kept
    (1, 1), an alpha-outer scan would stop at (0.39, 2.96); the released scan stops at beta's 5th
    value (0.238), where only alpha's 19th (2.71) is large enough.
    """
    clip = torch.tensor([[0.3, 0.0]])
    affinity = torch.tensor([[0.5, 1.0]])  # cosine to a class-0 key and to a class-1 key
    values, labels = torch.eye(2), torch.tensor([1])
    alpha, beta = search(clip, affinity, values, labels)
    assert (alpha, beta) == (ALPHAS[18], BETAS[4])
    # The released loop, on features, keys and text weights that give this clip and affinity.
    f = torch.tensor([[1.0, 0.0, 0.0]])
    keys = torch.tensor([[0.5, math.sqrt(0.75), 0.0], [1.0, 0.0, 0.0]])  # f.key = 0.5, 1.0
    weights = torch.tensor([[0.3, 0.0], [0.0, 0.0], [0.0, 1.0]])  # 1.0 * f @ W = [0.3, 0]
    torch.testing.assert_close(f @ keys.T, affinity)
    assert released_search_hp(f, keys.T, values, labels, weights, logit_scale=1.0) == (alpha, beta)

    def correct(a, b):
        return bool((clip + ((-1) * (b - b * affinity)).exp() @ values * a).argmax(-1).eq(labels).all())

    assert correct(1.0, 1.0) and not correct(ALPHAS[17], BETAS[4])
    assert not any(correct(a, b) for b in BETAS[:4] for a in ALPHAS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_equals_the_released_loop_on_random_features(seed):
    """Many ties (12 val images, 4,000 points): the same point as the released loop, every time."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(C, D, generator=g)
    keys = F.normalize(centers.repeat_interleave(4, 0) + 0.8 * torch.randn(4 * C, D, generator=g), dim=-1)
    values = F.one_hot(torch.arange(C).repeat_interleave(4), C).float()
    labels = torch.arange(C).repeat_interleave(4)
    val = F.normalize(centers[labels] + 0.8 * torch.randn(len(labels), D, generator=g), dim=-1)
    text = F.normalize(centers + 1.5 * torch.randn(C, D, generator=g), dim=-1)
    expected = released_search_hp(val, keys.T, values, labels, text.T)
    assert search(100.0 * val @ text.T, val @ keys.T, values, labels) == expected
    assert expected != (0, 0)


def test_nothing_right_on_val_gives_the_released_zero_zero_that_is_zero_shot():
    """Val labels that neither CLIP nor the cache can reach: as released, (alpha, beta) = (0, 0)."""
    centers = np.eye(C, D, dtype=np.float32)
    labels = np.arange(C)
    train = np.repeat(centers[:, None, :], 2, axis=1)
    data = FewShot(train, labels, centers, (labels + 1) % C, centers, 100.0)  # val labels shifted
    tip = make("tip-adapter", data.text, data.logit_scale)
    assert tip.fit(data, seed=1).chosen == {"alpha": 0.0, "beta": 0.0}
    x = torch.from_numpy(centers)
    torch.testing.assert_close(tip(x), 100.0 * x @ torch.from_numpy(centers).T)


def test_tip_adapter_uses_the_backbone_logit_scale():
    """The released code writes 100 (OpenAI's exp(logit_scale)); ca-flow takes the backbone's."""
    rng = np.random.default_rng(5)
    text = F.normalize(torch.from_numpy(rng.normal(size=(C, D)).astype(np.float32)), dim=-1)
    x = torch.from_numpy(rng.normal(size=(4, D)).astype(np.float32))
    for scale in (100.0, 37.5):
        tip = make("tip-adapter", text, scale, alpha=0.0, search=False)
        torch.testing.assert_close(tip(x), scale * F.normalize(x, dim=-1) @ text.T)


# -- Other protocol claims ----------------------------------------------------------------------------


def test_augment_views_default_to_ten_as_the_released_augment_epoch():
    from workflows.grid import SweepSpec

    assert SweepSpec().augment_views == 10


def test_clip_adapter_draws_one_cached_view_per_image_per_epoch():
    """Each epoch sees every image exactly once (the last partial batch kept), as one of its views."""
    from clip_adapter.adapter import CLIPAdapter
    from clip_adapter.train import TrainConfig, fit

    rng = np.random.default_rng(6)
    n, views = 7, 3
    feats = rng.normal(size=(n, views, D)).astype(np.float32)
    adapter = CLIPAdapter(F.normalize(torch.randn(C, D), dim=-1), 100.0)
    seen = []
    forward = adapter.forward
    adapter.forward = lambda x: (seen.append(x.detach().clone()), forward(x))[1]
    fit(adapter, feats, np.arange(n) % C, TrainConfig(epochs=4, batch_size=3), seed=1)
    assert [len(x) for x in seen] == [3, 3, 1] * 4
    picked = set()
    for epoch in range(4):
        rows = torch.cat(seen[3 * epoch : 3 * epoch + 3]).numpy()
        where = [tuple(zip(*np.nonzero((feats == row).all(-1))))[0] for row in rows]  # (image, view)
        assert sorted(i for i, _ in where) == list(range(n))
        picked |= {v for _, v in where}
    assert len(picked) > 1  # views are drawn, not always the first


def test_clip_adapter_epochs_follow_shots():
    from clip_adapter.train import epochs_for_shots

    assert {k: epochs_for_shots(k) for k in (1, 2, 4, 8, 16)} == {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}


def dassl_lr_per_epoch(cfg_epochs, lr=0.002, warmup_epoch=1, cons_lr=1e-5):
    """The lr of each epoch under Dassl's cosine + ConstantWarmupScheduler (WARMUP_RECOUNT True),
    stepped once at the end of each epoch as TrainerX does."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

    class ConstantWarmup(LRScheduler):
        def __init__(self, optimizer, successor):
            self.successor = successor
            super().__init__(optimizer)

        def get_lr(self):
            if self.last_epoch >= warmup_epoch:
                return self.successor.get_last_lr()
            return [cons_lr for _ in self.base_lrs]

        def step(self, epoch=None):
            if self.last_epoch >= warmup_epoch:
                self.successor.step()
                self._last_lr = self.successor.get_last_lr()
            else:
                super().step()

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = ConstantWarmup(opt, CosineAnnealingLR(opt, float(cfg_epochs)))
    out = []
    for _ in range(cfg_epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedule_is_dassls_warm_up_then_restarted_cosine():
    """Warm-up epoch at 1e-5, then cosine over all epochs, counted from the end of the warm-up as
    Dassl's ConstantWarmupScheduler (re-implemented above) counts it."""
    from clip_adapter.train import TrainConfig, lr_at

    for epochs in (10, 50):
        cfg = TrainConfig(epochs=epochs)
        ours = [lr_at(e, cfg) for e in range(cfg.epochs)]
        dassl = dassl_lr_per_epoch(cfg.epochs)
        assert ours[0] == 1e-5 and ours[1] == 0.002
        assert ours == pytest.approx(dassl)


def test_linear_probe_c_grid_decades_and_ties_keep_the_smaller_c(monkeypatch):
    """C over 1e-2..1e4 on val; every cached view a sample, L2-normalised; a tie keeps the smaller C.

    A stand-in for sklearn's LogisticRegression records what it is fitted on and is right on val
    only from C = 1 on, so C = 1, 10, ... tie at 100% and C = 1 must win.
    """
    import sklearn.linear_model

    from clip_adapter.methods.linear_probe import C_GRID

    assert C_GRID == (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
    fitted = []

    class Probe:
        def __init__(self, C, **kwargs):
            self.C = C

        def fit(self, x, y):
            fitted.append((self.C, x, y))
            self.classes_ = np.arange(C)
            sign = 1.0 if self.C >= 1 else -1.0
            self.coef_ = sign * np.eye(C, D, dtype=np.float32)
            self.intercept_ = np.zeros(C, dtype=np.float32)
            return self

    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", Probe)
    rng = np.random.default_rng(7)
    train = (
        5.0 * rng.uniform(0.5, 2.0, size=(6, 4, 1)) * np.eye(C, D)[np.arange(6) % C][:, None, :]
        + 0.01 * rng.normal(size=(6, 4, D))
    ).astype(np.float32)
    val = np.eye(C, D, dtype=np.float32) * 3.0
    data = FewShot(train, np.arange(6) % C, val, np.arange(C), np.eye(C, D, dtype=np.float32), 100.0)
    probe = make("linear-probe", data.text, data.logit_scale)
    assert probe.fit(data, seed=1).chosen == {"C": 1.0}
    assert [c for c, _, _ in fitted] == list(C_GRID)
    _, x, y = fitted[0]
    assert x.shape == (6 * 4, D) and np.allclose(np.linalg.norm(x, axis=-1), 1.0)
    assert y.tolist() == np.repeat(np.arange(6) % C, 4).tolist()


def test_imagenet_images_within_a_class_are_sorted(tmp_path):
    """CoOp lists a class folder in filesystem order; ca-flow sorts, so subsets match across machines."""
    from clip_adapter.datasets import load, resolve

    root = tmp_path / "imagenet"
    (root / "classnames.txt").parent.mkdir(parents=True)
    (root / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    names = ["n_9.JPEG", "n_1.JPEG", "n_5.JPEG", "n_10.JPEG", "n_3.JPEG"]
    for split in ("train", "val"):
        for wnid in ("n02", "n01"):
            (root / "images" / split / wnid).mkdir(parents=True)
            for name in names:
                (root / "images" / split / wnid / name).write_bytes(b"")
    (found,) = resolve("imagenet", tmp_path)
    split = load(found)
    assert [p.rsplit("/", 2)[-2:] for p in (i.path for i in split.train)] == [
        [w, n] for w in ("n01", "n02") for n in sorted(names)
    ]
    assert [i.label for i in split.train] == [0] * 5 + [1] * 5
