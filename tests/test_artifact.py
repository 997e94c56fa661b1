import json
import zipfile

import pytest
import torch

from clip_adapter import AdapterClassifier, AdapterMeta, load_adapter, make, save_adapter
from clip_adapter.backbone import TINY, BackboneError, load_backbone, weights_identity


def adapter_and_meta(width, text=None, **config):
    text = torch.randn(3, width) if text is None else text
    method = make("clip-adapter", text, 14.3, **{"alpha": 0.4, **config})
    meta = AdapterMeta(
        method="clip-adapter",
        config=method.config(),
        backbone=TINY,
        weights="random",
        weights_id=weights_identity("random"),
        classnames=["red", "green", "blue"],
        template="a photo of a {}.",
        logit_scale=14.3,
        dataset="colours",
    )
    return method.eval(), text, meta


def test_round_trip_is_safetensors_and_json(tmp_path, tiny):
    method, text, meta = adapter_and_meta(tiny.width, beta=0.2, variant="both")
    torch.nn.init.normal_(method.adapter.visual[0].weight)
    save_adapter(tmp_path, method, text, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert not zipfile.is_zipfile(tmp_path / "adapter.safetensors")  # not a torch pickle archive
    saved = json.loads((tmp_path / "adapter.json").read_text())
    assert saved["classnames"] == ["red", "green", "blue"]
    assert saved["config"]["alpha"] == 0.4 and saved["config"]["beta"] == 0.2
    loaded, m = load_adapter(tmp_path)
    x = torch.randn(4, tiny.width)
    assert torch.equal(loaded(x), method(x)) and m.config["variant"] == "both"


def test_classifier_reproduces_the_random_backbone_and_predicts(tmp_path, tiny, colour_root):
    adapter, text, meta = adapter_and_meta(tiny.width)
    save_adapter(tmp_path, adapter, text, meta)
    clf = AdapterClassifier(tmp_path, device="cpu")
    image = next((colour_root / "colours" / "red").iterdir())
    (top,) = clf.predict([image], top_k=2)
    assert len(top) == 2 and top[0][0] in {"red", "green", "blue"} and top[0][1] >= top[1][1]
    # The oracle is open_clip's own test transform (ToTensor + Normalize in one), not ca-flow's split one.
    import open_clip
    from PIL import Image

    _, _, test_transform = open_clip.create_model_and_transforms(TINY, pretrained=None)
    expected = adapter(tiny.encode_images(test_transform(Image.open(image).convert("RGB"))[None])).softmax(-1)
    torch.testing.assert_close(clf.probabilities([image]), expected)


def test_weights_file_must_be_the_one_trained_on(tmp_path, tiny):
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(weights))
    method, text, meta = adapter_and_meta(tiny.width)
    meta.weights, meta.weights_id = str(weights), weights_identity(str(weights))
    save_adapter(tmp_path / "a", method, text, meta)
    assert AdapterClassifier(tmp_path / "a", device="cpu").backbone.weights == str(weights)
    weights.write_bytes(b"changed")
    with pytest.raises(BackboneError, match="not the ones this adapter was trained on"):
        AdapterClassifier(tmp_path / "a", device="cpu")


def test_unloadable_weights_fail_clearly_never_fall_back(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(TINY, str(tmp_path / "missing.pt"))
    with pytest.raises(BackboneError, match="cannot load 'openai' weights"):
        load_backbone(TINY, "openai")
