"""The library's own settings: where ca-flow keeps what it caches, and the data root's variable.

workflows/settings.py lists these with every other environment variable ca-flow reads or sets.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path("~/.cache/ca-flow")  # written once: everything ca-flow caches lives under it
DATA_ROOT_VAR = "CA_FLOW_DATA_ROOT"


def data_root() -> str:
    """$CA_FLOW_DATA_ROOT, else ~/.cache/ca-flow/data: the folder (or URI) that holds the datasets."""
    return os.environ.get(DATA_ROOT_VAR) or str((CACHE / "data").expanduser())
