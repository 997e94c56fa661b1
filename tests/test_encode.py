"""The Ray Data pipeline and the library's in-process loop make the same features from the same
images: what lets the test session pre-encode its feature store in-process (conftest.textile_features)
and the sweeps that copy it stand for sweeps that encode."""
from __future__ import annotations

import numpy as np

from clip_adapter.datasets import load, resolve
from clip_adapter.features import Request, encode_in_process
from workflows.encode import pipeline


def rows_by_request(rows) -> dict:
    return {(r["request"], r["view"]): (r["image_id"], r["feature"]) for r in rows if not r["error"]}


def test_the_pipeline_and_the_in_process_loop_encode_alike(ray_local, colour_root, tiny):
    split = load(resolve("colours", colour_root)[0])
    items = split.train[:6] + split.test[:4]
    requests = [Request("colours", str(i.path), str(i.path), 0, 0, [0, 1, 2] if n < 6 else [0], n < 6)
                for n, i in enumerate(items)]
    piped = rows_by_request(pipeline(requests, "ca-flow-tiny", "random", tiny.preprocess_cfg, 0.0, 1, 1))
    local = rows_by_request(encode_in_process(tiny, requests))
    assert set(piped) == set(local) and len(local) == 6 * 3 + 4
    for key, (image_id, feature) in local.items():
        assert piped[key][0] == image_id
        np.testing.assert_allclose(piped[key][1], feature, rtol=1e-5, atol=1e-6, err_msg=str(key))
