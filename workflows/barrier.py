"""A test hook: where a fault must land is decided by the test, not by timing.

With CA_FLOW_TEST_BARRIER=<dir> set, code that reaches a named point writes <dir>/<name>.started
(holding its pid) and waits until the test creates <dir>/<name>.release. Unset (always, outside
tests), `barrier` returns at once.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

VARIABLE = "CA_FLOW_TEST_BARRIER"


def barrier(name: str) -> None:
    folder = os.environ.get(VARIABLE)
    if not folder:
        return
    Path(folder, f"{name}.started").write_text(str(os.getpid()))
    while not Path(folder, f"{name}.release").exists():
        time.sleep(0.05)
