"""Rules whose breakage would give a silently wrong result, on data that makes the breakage visible.

Each test holds one rule with an oracle written here (the numbers, or the released code written out),
on data chosen so that a plausible wrong version of the rule gives another answer: an image folder
beside the allowed one that shares its prefix, weights that differ on one cache dir, class labels that
are not in the order the images are listed, a registry champion on other weights.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import make_colour_tree
from mlflow.exceptions import MlflowException

from clip_adapter.backbone import TINY
from clip_adapter.datasets import few_shot, load, resolve

# -- serving: the image-root allow-list is a folder, not a string prefix ---------------------------


def test_the_allow_list_refuses_a_sibling_folder_that_shares_the_roots_prefix(tmp_path):
    from workflows.adapter_model import ClipAdapterModel

    root, sibling = tmp_path / "srv" / "images", tmp_path / "srv" / "images-private"
    for folder in (root / "red", sibling):
        folder.mkdir(parents=True)
    (root / "red" / "x.png").write_bytes(b"inside")
    (sibling / "x.png").write_bytes(b"secret")
    model = ClipAdapterModel()
    model.image_root = root.resolve()  # what load_context sets from model_config={"image_root": ...}
    assert model._image(0, str(root / "red" / "x.png")) == b"inside"
    for outside in (sibling / "x.png", root / ".." / "images-private" / "x.png"):
        with pytest.raises(MlflowException, match="is outside the allowed image root"):
            model._image(0, str(outside))


# -- feature store: features and text classifiers are keyed by the weights --------------------------


@pytest.fixture
def weights_file(tmp_path):
    """Real weights other than the seeded random ones: the tiny backbone initialised with another seed,
    as a local safetensors file (it stands in for downloaded CLIP weights, offline)."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(12345)
    model = open_clip.create_model(TINY, pretrained=None)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_the_feature_store_never_serves_features_or_text_of_other_weights(tmp_path, tiny, weights_file):
    """The README's demo: `--pretrained random`, then real weights on the same --cache-dir."""
    from clip_adapter.backbone import load_backbone
    from clip_adapter.encoding import LocalEncoder, text_classifier
    from clip_adapter.features import FeatureStore

    make_colour_tree(tmp_path / "data" / "colours", per_class=2)
    split = load(resolve("colours", tmp_path / "data")[0])
    cache = tmp_path / "cache"
    names, template = ["red", "green", "blue"], "a photo of a {}."

    random_enc = LocalEncoder(TINY, "random")
    random_enc._backbone = tiny
    first = FeatureStore(cache, TINY, "random")
    random_feats = first.images("colours", split.root, split.test, 1, False, random_enc).features
    first.put_text(names, template, *random_enc.text(names, template))

    other = load_backbone(TINY, weights_file, "cpu")
    asked = []

    def other_enc(requests):
        asked.extend(r.path for r in requests)
        enc = LocalEncoder(TINY, weights_file)
        enc._backbone = other
        return enc(requests)

    second = FeatureStore(cache, TINY, weights_file)
    assert second.text(names, template) is None  # the random weights' classifier is not served
    feats = second.images("colours", split.root, split.test, 1, False, other_enc).features
    assert sorted(asked) == sorted(i.path for i in split.test)  # every image encoded again
    # The oracle: the other weights' own encoding of each centre crop, without the store.
    from clip_adapter.images import crops, decode, image_id

    blobs = [open(i.path, "rb").read() for i in split.test]
    expected = np.stack(
        [other.encode_pixels(crops(decode(b), image_id(b), [0], False, other.preprocess))[0] for b in blobs]
    )
    np.testing.assert_allclose(feats[:, 0], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(feats, random_feats)
    # and back: the random weights' entries are still the random weights' own
    again = FeatureStore(cache, TINY, "random").images(
        "colours", split.root, split.test, 1, False, lambda r: pytest.fail(f"re-encoded {len(r)}")
    )
    np.testing.assert_array_equal(again.features, random_feats)
    text, _ = FeatureStore(cache, TINY, "random").text(names, template)
    np.testing.assert_allclose(text, text_classifier(tiny, names, template))


# -- few-shot subsets: Dassl's, when labels are not in the order the images are listed --------------


def dassl_generate_fewshot_dataset(items, num_shots):
    """Dassl's DatasetBase.generate_fewshot_dataset (one data source), written out: classes in the
    order their first image is listed, random.sample per class, all of a class with fewer."""
    tracker = defaultdict(list)
    for item in items:
        tracker[item.label].append(item)
    dataset = []
    for label, group in tracker.items():
        dataset.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return dataset


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_few_shot_subsets_equal_dassls_when_labels_are_not_in_listing_order(tmp_path, seed):
    from test_coop_datasets import FGVC, make_fgvc

    make_fgvc(tmp_path)  # its variant lists name the last variant (label 3) first
    split = load(resolve("fgvc_aircraft", tmp_path)[0])
    assert [i.label for i in split.train[:1]] == [len(FGVC) - 1]
    random.seed(seed)  # CoOp seeds the global `random` once, then draws train, then val
    expected = (dassl_generate_fewshot_dataset(split.train, 2), dassl_generate_fewshot_dataset(split.val, 2))
    train, val = few_shot(split, 2, seed)
    assert (train, val) == expected
    assert [i.label for i in train] == [3, 3, 2, 2, 1, 1, 0, 0]


# -- promotion: @champion never moves to a run on other weights or another backbone ---------------


def test_champion_never_moves_to_a_better_run_on_other_weights_or_backbone(tmp_path):
    import mlflow
    from workflows.promote import model_name, promote

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("ca-flow", artifact_location=str(tmp_path / "artifacts"))

    def run(backbone, weights_id, val_acc):
        r = client.create_run(exp)
        for k, v in dict(
            backbone=backbone,
            weights=weights_id,
            weights_id=weights_id,
            shots=4,
            seed=1,
            alpha=0.2,
            method="clip-adapter",
        ).items():
            client.log_param(r.info.run_id, k, v)
        client.log_metric(r.info.run_id, "val_acc", val_acc)
        client.set_terminated(r.info.run_id)
        return client.get_run(r.info.run_id)

    name = model_name("colours")
    champion = run("RN50-quickgelu", "tag-openai", 0.50)
    client.create_registered_model(name)
    mv = client.create_model_version(
        name,
        f"runs:/{champion.info.run_id}/adapter",
        run_id=champion.info.run_id,
        tags=dict(backbone="RN50-quickgelu", weights="openai", weights_id="tag-openai", val_acc="0.5"),
    )
    client.set_registered_model_alias(name, "champion", mv.version)

    for backbone, weights_id in (("RN50-quickgelu", "random-seed0"), ("ViT-B-32-quickgelu", "tag-openai")):
        better = run(backbone, weights_id, 0.99)
        for dry_run in (True, False):  # the dry run says what a real one would do, and the real one does it
            decision = promote(client, "colours", better, "champion", dry_run=dry_run)
            assert (
                decision.action.startswith(f"kept v{mv.version} (")
                and "is not comparable with" in decision.action
            ), decision.action
        assert client.get_model_version_by_alias(name, "champion").version == mv.version
    # the same backbone and weights, better on val: that one would move it (the rule is not "never move")
    same = run("RN50-quickgelu", "tag-openai", 0.60)
    moving = promote(client, "colours", same, "champion", dry_run=True).action
    assert moving == f"would register, moving from v{mv.version}"
    assert promote(
        client, "colours", run("RN50-quickgelu", "tag-openai", 0.40), "champion"
    ).action.startswith(f"kept v{mv.version} (val_acc 0.5000 >= 0.4000")


# -- prediction: a saved adapter predicts CLIP-Adapter's released forward pass, written out ---------


@pytest.mark.parametrize("variant", ["visual", "text", "both"])
def test_a_saved_adapter_predicts_what_clip_adapters_formula_gives(tmp_path, tiny, colour_root, variant):
    from oracles import clip_adapter_top

    from clip_adapter import AdapterClassifier, AdapterMeta, make, save_adapter
    from clip_adapter.backbone import weights_identity
    from clip_adapter.encoding import text_classifier

    names = ["red", "green", "blue"]
    text = torch.from_numpy(text_classifier(tiny, names, "a photo of a {}."))
    method = make("clip-adapter", text, tiny.logit_scale, alpha=0.7, beta=0.4, variant=variant)
    torch.manual_seed(3)
    for p in method.parameters():  # far from zero-shot, so that a wrong blend shows
        torch.nn.init.normal_(p, std=0.5)
    save_adapter(
        tmp_path,
        method.eval(),
        text,
        AdapterMeta(
            method="clip-adapter",
            config=method.config(),
            backbone=TINY,
            weights="random",
            weights_id=weights_identity("random"),
            classnames=names,
            template="a photo of a {}.",
            logit_scale=tiny.logit_scale,
            dataset="colours",
        ),
    )
    image = next((colour_root / "colours" / "green").iterdir())
    got = AdapterClassifier(tmp_path, device="cpu").predict([image], 3)[0]
    want = clip_adapter_top(tmp_path, image, 3)
    assert [c for c, _ in got] == [c for c, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)
