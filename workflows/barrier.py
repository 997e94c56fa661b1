"""A test hook: where a fault lands is decided by the test, not by timing or epoch counts.

With CA_FLOW_TEST_BARRIER=<dir> set, and only at the points whose folder <dir>/<point>/ the test made
(`encode`: a crop task of the encoding pipeline; `trial`: a trial attempt, once the recorder holds
its start; `recorder`: the sweep's recorder, as it starts), the code writes
<dir>/<point>/<name>.started (JSON: its pid and `info`) and waits until <dir>/<point>/release or
<dir>/<point>/<name>.release exists. Unset (always, outside tests), it returns at once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .settings import TEST_BARRIER

VARIABLE = TEST_BARRIER.name


def holds(point: str) -> bool:
    root = os.environ.get(VARIABLE)
    return bool(root) and Path(root, point).is_dir()


def barrier(point: str, name: str, **info) -> None:
    if not holds(point):
        return
    folder = Path(os.environ[VARIABLE], point)
    tmp = folder / f"{name}.started.tmp"
    tmp.write_text(json.dumps(dict(pid=os.getpid(), **info)))
    tmp.replace(folder / f"{name}.started")  # whole when seen
    while not ((folder / "release").exists() or (folder / f"{name}.release").exists()):
        time.sleep(0.05)
