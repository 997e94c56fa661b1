import numpy as np
import pytest
from conftest import make_colour_tree

from clip_adapter.backbone import TINY
from clip_adapter.datasets import load, resolve
from clip_adapter.features import FeatureCache, LocalEncoder


class CountingEncoder(LocalEncoder):
    """The real encoder, counting the images it is asked to encode."""
    calls = 0
    images_seen = 0

    def images(self, blobs, views, augment):
        self.calls += 1
        self.images_seen += len(blobs)
        return super().images(blobs, views, augment)


@pytest.fixture
def items(tmp_path):
    make_colour_tree(tmp_path / "data" / "colours", per_class=4)
    split = load(resolve("colours", tmp_path / "data")[0])
    return split.train + split.val + split.test


def encoder(tiny):
    enc = CountingEncoder(TINY, "random")
    enc._backbone = tiny
    return enc


def test_second_run_encodes_nothing(tmp_path, items, tiny):
    first, second = encoder(tiny), encoder(tiny)
    a = FeatureCache(tmp_path / "cache", TINY, "random").images(items, 3, True, first)
    b = FeatureCache(tmp_path / "cache", TINY, "random").images(items, 3, True, second)
    assert first.images_seen == len(items) and second.calls == 0
    np.testing.assert_array_equal(a.features, b.features)
    assert a.features.shape == (len(items), 3, tiny.width)
    assert not np.allclose(a.features[:, 0], a.features[:, 1])  # augmented views differ


def test_views_and_new_images_extend_the_cache(tmp_path, items, tiny):
    enc = encoder(tiny)
    cache = FeatureCache(tmp_path / "cache", TINY, "random")
    cache.images(items[:4], 1, False, enc)
    cache.images(items, 1, False, enc)
    assert enc.images_seen == len(items)  # the first four were not encoded again


def test_damaged_cache_file_is_rebuilt(tmp_path, items, tiny):
    cache = FeatureCache(tmp_path / "cache", TINY, "random")
    good = cache.images(items, 1, False, encoder(tiny))
    (path,) = cache.dir.glob("center.parquet")
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # flip bytes inside a data page
    path.write_bytes(bytes(data))
    enc = encoder(tiny)
    again = FeatureCache(tmp_path / "cache", TINY, "random").images(items, 1, False, enc)
    assert enc.images_seen == len(items)
    np.testing.assert_allclose(again.features, good.features, rtol=1e-5, atol=1e-5)

    path.write_bytes(b"PAR1 truncated")
    enc = encoder(tiny)
    FeatureCache(tmp_path / "cache", TINY, "random").images(items, 1, False, enc)
    assert enc.images_seen == len(items)


def test_unreadable_image_is_reported_by_path_and_left_out(tmp_path, items, tiny):
    bad = items[1]
    with open(bad.path, "wb") as fh:
        fh.write(b"not an image at all")
    reported = {}
    feats = FeatureCache(tmp_path / "cache", TINY, "random").images(
        items, 1, False, encoder(tiny), on_bad=lambda p, r: reported.setdefault(p, r))
    assert list(reported) == [bad.path] and "cannot decode" in reported[bad.path]
    assert feats.ok.tolist() == [i != 1 for i in range(len(items))]


def test_text_classifier_is_cached_and_normalised(tmp_path, tiny):
    enc = encoder(tiny)
    cache = FeatureCache(tmp_path / "cache", TINY, "random")
    w, scale = cache.text(["red", "green"], "a photo of a {}.", enc)
    tiny_calls = []
    enc.text = lambda *a: tiny_calls.append(a)  # a cache hit must not reach the encoder
    w2, scale2 = FeatureCache(tmp_path / "cache", TINY, "random").text(["red", "green"], "a photo of a {}.", enc)
    assert not tiny_calls
    np.testing.assert_array_equal(w, w2)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
    assert scale == scale2 == pytest.approx(tiny.logit_scale)
