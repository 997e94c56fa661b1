"""The encoding pipeline (Ray Data crop tasks, encoder actors) against the in-process loop it stands for."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from conftest import make_colour_tree

from clip_adapter.backbone import TINY
from clip_adapter.encoding import encode_in_process
from clip_adapter.features import Request

pytestmark = pytest.mark.slow


def test_pipeline_gives_the_loops_features_and_logs_nothing_that_reads_as_an_error(
    ray_local, tiny, tmp_path, capfd
):
    from workflows.encode import CROP_BATCH, IN_FLIGHT, pipeline

    images = sorted(make_colour_tree(tmp_path / "colours", per_class=70).rglob("*.png"))
    assert len(images) > CROP_BATCH * (IN_FLIGHT + 1)  # more blocks than the encoder holds at once
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    gone = tmp_path / "gone.png"
    shutil.copy(images[0], gone)
    gone.unlink()
    paths = [*images[:5], broken, *images[5:100], gone, *images[100:]]  # failed rows amid good ones
    requests = [
        Request("colours", str(p), p.name, 0, 0, [0, 1] if i % 3 == 0 else [0], i % 3 == 0)
        for i, p in enumerate(paths)
    ]

    def by_view(rows):
        return {(r["request"], r["view"]): r for r in rows}

    capfd.readouterr()
    got = by_view(pipeline(requests, TINY, "random", tiny.preprocess_cfg, 0.0, 1, 1))
    logged = capfd.readouterr()
    want = by_view(encode_in_process(tiny, requests))

    assert got.keys() == want.keys()
    for key, row in want.items():
        if row["error"]:  # the broken and the missing image: left out with a reason, not encoded
            assert got[key]["error"] and got[key]["image_id"] == "", got[key]
            continue
        assert got[key]["image_id"] == row["image_id"] and not got[key]["error"], (key, got[key])
        np.testing.assert_allclose(got[key]["feature"], row["feature"], atol=1e-5)
    assert sum(bool(r["error"]) for r in got.values()) == 2
    # Ray Data's own actor pool made Ray log, at error level, "... has constructor arguments in the
    # object store and max_restarts > 0 ..." at every start.
    noise = [
        line
        for line in (logged.out + logged.err).splitlines()
        if re.search(r"core_worker|constructor arguments|\berror\b|Traceback", line, re.I)
    ]
    assert not noise, noise
