"""The feature store: shards per dataset and view kind, an index so warm reads touch no image bytes."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_colour_tree
from PIL import Image

from clip_adapter import encoding
from clip_adapter import images as im
from clip_adapter.backbone import TINY
from clip_adapter.datasets import load, resolve
from clip_adapter.encoding import LocalEncoder
from clip_adapter.features import FeatureStore


class CountingEncoder(LocalEncoder):
    """The real in-process encoder, counting the (image, view) pairs it is asked for."""

    def __call__(self, requests):
        self.asked = getattr(self, "asked", []) + [(r.path, v) for r in requests for v in r.views]
        return super().__call__(requests)


@pytest.fixture
def split(tmp_path):
    make_colour_tree(tmp_path / "data" / "colours", per_class=4)
    return load(resolve("colours", tmp_path / "data")[0])


def encoder(tiny):
    enc = CountingEncoder(TINY, "random")
    enc._backbone = tiny
    return enc


def store(tmp_path):
    return FeatureStore(tmp_path / "cache", TINY, "random")


def images(st, split, items, views, augment, enc, on_bad=None):
    return st.images("colours", split.root, items, views, augment, enc, on_bad)


def test_warm_read_encodes_nothing_and_reads_no_image_bytes(tmp_path, split, tiny, monkeypatch):
    items = split.train + split.val + split.test
    first = encoder(tiny)
    a = images(store(tmp_path), split, items, 3, True, first)
    assert len(first.asked) == 3 * len(items)

    def no_bytes(path):
        raise AssertionError(f"a warm read opened {path}")

    monkeypatch.setattr(encoding, "read_bytes", no_bytes)
    second = encoder(tiny)
    b = images(store(tmp_path), split, items, 3, True, second)
    assert not getattr(second, "asked", [])
    np.testing.assert_array_equal(a.features, b.features)
    assert a.features.shape == (len(items), 3, tiny.width) and a.ok.all()
    assert not np.allclose(a.features[:, 0], a.features[:, 1])  # augmented views differ


def test_more_views_encode_only_the_new_views(tmp_path, split, tiny):
    items = split.train[:5]
    one = images(store(tmp_path), split, items, 1, True, encoder(tiny))
    enc = encoder(tiny)
    three = images(store(tmp_path), split, items, 3, True, enc)
    assert sorted(enc.asked) == sorted((i.path, v) for i in items for v in (1, 2))
    np.testing.assert_array_equal(three.features[:, 0], one.features[:, 0])
    # ...and a view computed alone equals the same view computed with the others (seeded per view)
    fresh = images(FeatureStore(tmp_path / "other", TINY, "random"), split, items, 3, True, encoder(tiny))
    np.testing.assert_allclose(three.features, fresh.features, rtol=1e-5, atol=1e-6)


def test_new_and_changed_images_are_encoded_the_rest_is_not(tmp_path, split, tiny):
    items = split.train + split.val + split.test
    images(store(tmp_path), split, items[:4], 1, False, encoder(tiny))
    enc = encoder(tiny)
    images(store(tmp_path), split, items, 1, False, enc)
    assert sorted(p for p, _ in enc.asked) == sorted(i.path for i in items[4:])
    changed = items[0].path
    Image.new("RGB", (40, 40), (1, 2, 3)).save(changed)
    os.utime(changed, ns=(1, 1))  # a new size and mtime: the index no longer matches
    enc = encoder(tiny)
    images(store(tmp_path), split, items, 1, False, enc)
    assert [p for p, _ in enc.asked] == [changed]


def test_two_writers_at_once_keep_both(tmp_path, split, tiny):
    """Shards are only added: two sweeps encoding at once lose none of each other's rows."""
    st_a, st_b = store(tmp_path), store(tmp_path)
    plan_a = st_a.plan("colours", split.root, split.train, 1, False)
    plan_b = st_b.plan("colours", split.root, split.test, 1, False)
    with st_a.writer() as wa:
        with st_b.writer() as wb:
            wb.add_all(plan_b.todo, encoder(tiny)(plan_b.todo))
        wa.add_all(plan_a.todo, encoder(tiny)(plan_a.todo))
    enc = encoder(tiny)
    images(store(tmp_path), split, split.train + split.test, 1, False, enc)
    assert not getattr(enc, "asked", [])


@pytest.mark.parametrize("damage", ["flip-bytes", "truncate", "other-schema"])
def test_damaged_or_foreign_shard_is_removed_and_rebuilt(tmp_path, split, tiny, damage, caplog):
    items = split.test
    good = images(store(tmp_path), split, items, 1, False, encoder(tiny))
    (path,) = (store(tmp_path).dir / "colours" / "center").glob("part-*.parquet")
    if damage == "flip-bytes":
        data = bytearray(path.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # inside a data page
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(b"PAR1 truncated")
    else:  # a valid Parquet file that is not ca-flow's
        pq.write_table(pa.table({"image_id": ["x"], "embedding": [1.0]}), path)
    enc = encoder(tiny)
    again = images(store(tmp_path), split, items, 1, False, enc)
    assert len(enc.asked) == len(items)
    assert "is damaged" in caplog.text and not path.exists()
    np.testing.assert_allclose(again.features, good.features, rtol=1e-5, atol=1e-5)


def test_unreadable_image_is_reported_by_path_and_left_out(tmp_path, split, tiny):
    items = split.test
    with open(items[1].path, "wb") as fh:
        fh.write(b"not an image at all")
    os.remove(items[2].path)
    reported = {}
    feats = images(
        store(tmp_path), split, items, 1, False, encoder(tiny), on_bad=lambda p, r: reported.setdefault(p, r)
    )
    assert reported == {items[1].path: reported[items[1].path], items[2].path: "no such file"}
    assert "cannot decode" in reported[items[1].path]
    assert feats.ok.tolist() == [i not in (1, 2) for i in range(len(items))]


def test_store_files_get_the_umask_mode(tmp_path, split, tiny):
    old = os.umask(0o022)
    try:
        images(store(tmp_path), split, split.test, 1, False, encoder(tiny))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


def test_text_classifier_is_stored_and_normalised(tmp_path, tiny):
    st = store(tmp_path)
    assert st.text(["red", "green"], "a photo of a {}.") is None
    w, scale = LocalEncoder(TINY, "random", _backbone=tiny).text(["red", "green"], "a photo of a {}.")
    st.put_text(["red", "green"], "a photo of a {}.", w, scale)
    w2, scale2 = store(tmp_path).text(["red", "green"], "a photo of a {}.")
    np.testing.assert_array_equal(w, w2)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
    assert scale == scale2 == pytest.approx(tiny.logit_scale)


def test_split_preprocessing_equals_open_clips_transform(split, tiny):
    """Crops in CPU workers + normalisation beside the encoder == open_clip's one-piece transform."""
    import open_clip
    import torchvision.transforms as T

    _, _, test_transform = open_clip.create_model_and_transforms(TINY, pretrained=None)
    image = im.decode(open(split.test[0].path, "rb").read())
    ours = tiny.preprocess.normalize(im.crops(image, "ab" * 20, [0], False, tiny.preprocess))
    assert torch.equal(ours[0], test_transform(image))
    norm = next(t for t in test_transform.transforms if isinstance(t, T.Normalize))
    coop = T.Compose(
        [
            T.RandomResizedCrop(64, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            norm,
        ]
    )
    img_id = "0123456789abcdef" * 2
    for view in (0, 3):
        torch.manual_seed(im._view_seed(img_id, view))
        expected = coop(image)
        got = tiny.preprocess.normalize(im.crops(image, img_id, [view], True, tiny.preprocess))[0]
        assert torch.equal(got, expected)


def test_decompression_bomb_is_refused_with_a_clear_reason():
    blob = _huge_png()
    with pytest.raises(im.ImageError, match="refused: .*downscale"):
        im.decode(blob)


def _huge_png() -> bytes:
    """A tiny file that claims 200 megapixels (PIL's bomb check reads the header only)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 10000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_views_cropped_from_half_are_a_kind_of_their_own(tmp_path, split, tiny):
    """Tip-Adapter main.py:74-78 and ICLR24 main_few_shots.py:24-29 crop RandomResizedCrop(scale=(0.5, 1))."""
    pre = tiny.preprocess
    assert pre.geometric(True).transforms[0].scale == (0.08, 1.0)  # CoOp's, the default
    assert pre.geometric(True, 0.5).transforms[0].scale == (0.5, 1.0)
    st, enc = store(tmp_path), encoder(tiny)
    coop = images(st, split, split.train, 2, True, enc)
    half = st.images("colours", split.root, split.train, 2, True, enc, scale=0.5)
    assert len(enc.asked) == 2 * 2 * len(split.train)  # each kind encoded once
    assert not np.allclose(coop.features, half.features)
    folder = tmp_path / "cache"
    assert {p.parent.name for p in folder.rglob("part-*.parquet")} >= {"augment", "augment-0.5"}
    again = encoder(tiny)
    np.testing.assert_array_equal(
        st.images("colours", split.root, split.train, 2, True, again, scale=0.5).features, half.features
    )
    assert not getattr(again, "asked", [])
