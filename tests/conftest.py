"""Shared fixtures: generated images, the tiny open_clip model, one local Ray per session.

The session gets its own HOME before Ray or MLflow load: Ray's auth token, Tune's ~/ray_results,
ca-flow's feature store and logs all land there, never in the user's. Ray keeps its default token
authentication, as a user's would.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_HOME = tempfile.mkdtemp(prefix="ca-flow-test-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["HOME"] = _HOME
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
for _name in (
    "RAY_ADDRESS",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_RUN_ID",
    "CA_FLOW_DATA_ROOT",
    "RAY_AUTH_MODE",
):
    os.environ.pop(_name, None)

import gc  # noqa: E402

from workflows.cli import GC_THRESHOLD  # noqa: E402

gc.set_threshold(*GC_THRESHOLD)  # set before torch, Ray and MLflow load, for the ca-flow command's reason

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)  # tiny matmuls: one thread is many times faster on 2 cores

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_colour_tree(root: Path, per_class: int = 20, size: int = 48, seed: int = 0) -> Path:
    """A folder-per-class tree whose class is plain to see: the dominant colour, with noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def home() -> Path:
    return Path(_HOME)


@pytest.fixture(scope="session")
def colour_root(tmp_path_factory) -> Path:
    """A data root holding one generated imagefolder dataset, `colours`."""
    root = tmp_path_factory.mktemp("data")
    make_colour_tree(root / "colours")
    return root


@pytest.fixture(scope="session")
def tiny():
    from clip_adapter import load_backbone
    from clip_adapter.backbone import TINY

    return load_backbone(TINY, "random", "cpu")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process CLI tests, started as ca-flow starts it (token auth on)."""
    import ray

    from workflows.connect import connect_ray

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    connect_ray(None)  # the rest of ca-flow's set-up (quiet Ray Data) on the running Ray
    yield ray
    ray.shutdown()


TEXTILE_SHOTS, TEXTILE_SEEDS, TEXTILE_VIEWS = (1, 2, 4, 8, 16), (1, 2, 3), 10


@pytest.fixture(scope="session")
def textile_features(tmp_path_factory, tiny) -> Path:
    """A feature store holding the textile images for the tiny random backbone: the few-shot train
    images of shots 1-16 and seeds 1-3 in 10 augmented views, every val and test image centre-cropped,
    the text classifier and the model's facts. Encoded once, in this process, with the library's own
    loop; a test that sweeps textile copies it (`copy_features`), so only the tests about encoding
    encode (test_features.py pins that this loop and the Ray Data pipeline give the same features)."""
    from clip_adapter import datasets
    from clip_adapter.backbone import TINY
    from clip_adapter.encoding import encode_in_process, text_classifier
    from clip_adapter.features import FeatureStore, Group

    root = tmp_path_factory.mktemp("textile-features")
    split = datasets.load(datasets.resolve("textile", root)[0])
    subsets = [datasets.few_shot(split, k, seed) for k in TEXTILE_SHOTS for seed in TEXTILE_SEEDS]
    train = list(dict.fromkeys(i for tr, _ in subsets for i in tr))
    held = list(dict.fromkeys(i for _, va in subsets for i in va)) + split.test
    store = FeatureStore(root, TINY, "random")
    store.images_of(
        [
            Group("textile", split.root, train, TEXTILE_VIEWS, True),
            Group("textile", split.root, held, 1, False),
        ],
        lambda todo: encode_in_process(tiny, todo),
    )
    store.put_model_info(dict(preprocess=tiny.preprocess_cfg, width=tiny.width, logit_scale=tiny.logit_scale))
    store.put_text(
        split.classnames,
        split.template,
        text_classifier(tiny, split.classnames, split.template),
        tiny.logit_scale,
    )
    return root


def copy_features(source: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(source, to)
    return to


def pytest_collection_modifyitems(items):
    """A test that needs the session's Ray (an in-process sweep, a Ray Data pipeline) is slow, as are
    those marked so by hand for starting processes: `-m "not slow"` is the tier to run after every change."""
    for item in items:
        if "ray_local" in item.fixturenames or "textile_features" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
