"""ca-flow's environment: nothing set at import time, and Tune's variables, set where a sweep starts
(after ray.tune is imported), still take effect: Tune then adds no per-trial CSV/JSON/TensorBoard logger."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, os
import workflows.cli, workflows.sweep, workflows.tracking, workflows.recorder  # every module that sets any
from ray.tune.utils.callback import _create_default_callbacks
from workflows import settings

names = [v.name for v in settings.TUNE + settings.MLFLOW]
at_import = {n: os.environ.get(n) for n in names}
before = sorted(type(c).__name__ for c in _create_default_callbacks([]))
settings.for_tune()
settings.for_mlflow()
after = sorted(type(c).__name__ for c in _create_default_callbacks([]))
print(json.dumps(dict(at_import=at_import, before=before, after=after,
                      set={n: os.environ.get(n) for n in names})))
"""


def test_tune_and_mlflow_variables_are_set_at_the_start_not_at_import():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNE_", "RAY_AIR_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(ROOT)
    out = json.loads(
        subprocess.run(
            [sys.executable, "-c", PROBE],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    assert set(out["at_import"].values()) == {None}, out["at_import"]
    assert {"CSVLoggerCallback", "JsonLoggerCallback"} <= set(out["before"])
    assert not {"CSVLoggerCallback", "JsonLoggerCallback", "TBXLoggerCallback"} & set(out["after"])
    assert out["set"] == {
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
        "RAY_AIR_NEW_OUTPUT": "0",
        "TUNE_DISABLE_SIGINT_HANDLER": "1",
        "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }
