"""Shared fixtures: generated images, the tiny open_clip model, one local Ray per session."""
from __future__ import annotations

import os

# Before ray/mlflow are imported anywhere: no auth token files in the user's HOME, no progress bars.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

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
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
