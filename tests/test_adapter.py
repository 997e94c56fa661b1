import pytest
import torch
import torch.nn.functional as F

from clip_adapter import CLIPAdapter, zero_shot_logits
from clip_adapter.adapter import VARIANTS, Bottleneck

D, C = 32, 5


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, D, generator=g), F.normalize(torch.randn(C, D, generator=g), dim=-1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_ratios_give_zero_shot_logits_exactly(inputs, variant):
    f, w = inputs
    adapter = CLIPAdapter(w, logit_scale=100.0, alpha=0.0, beta=0.0, variant=variant)
    torch.nn.init.normal_(next(adapter.parameters()))  # a trained-looking adapter must still vanish
    assert torch.equal(adapter(f), zero_shot_logits(f, w, 100.0))


def test_bottleneck_shapes_and_reduction():
    block = Bottleneck(1024, reduction=4)
    assert [tuple(m.weight.shape) for m in block if isinstance(m, torch.nn.Linear)] == [
        (256, 1024),
        (1024, 256),
    ]
    assert all(m.bias is None for m in block if isinstance(m, torch.nn.Linear))
    assert (block(torch.randn(3, 1024)) >= 0).all()  # the final ReLU of the released code


@pytest.mark.parametrize(
    "variant,trainable", [("visual", {"visual"}), ("text", {"text"}), ("both", {"visual", "text"})]
)
def test_variants_train_only_their_adapters(inputs, variant, trainable):
    adapter = CLIPAdapter(inputs[1], 100.0, variant=variant)
    assert {n.split(".")[0] for n, _ in adapter.named_parameters()} == trainable
    assert adapter(inputs[0]).shape == (7, C)


def test_residual_blend_follows_the_paper(inputs):
    f, w = inputs
    alpha, beta, scale = 0.3, 0.7, 50.0
    adapter = CLIPAdapter(w, scale, alpha=alpha, beta=beta, variant="both")
    f_star = alpha * adapter.visual(f) + (1 - alpha) * f  # eq. (2)/(4)
    w_star = beta * adapter.text(w) + (1 - beta) * w  # eq. (5)/(7)
    expected = scale * F.normalize(f_star, dim=-1) @ F.normalize(w_star, dim=-1).T
    torch.testing.assert_close(adapter(f), expected)
    assert not torch.allclose(adapter(f), zero_shot_logits(f, w, scale))


@pytest.mark.parametrize("kwargs", [{"alpha": 1.5}, {"alpha": -0.1}, {"beta": 2.0}, {"variant": "prompt"}])
def test_bad_hyperparameters_are_refused(inputs, kwargs):
    with pytest.raises(ValueError):
        CLIPAdapter(inputs[1], 100.0, **kwargs)
