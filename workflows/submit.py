"""`ca-flow sweep --submit`: the sweep as a Ray job, so the terminal that started it can go away.

The job runs the same `ca-flow sweep` with every flag resolved and the sweep id fixed here, so this
command can print the id and return; `ca-flow sweeps` / `status` follow the job through MLflow, and
`ray job stop` interrupts it like Ctrl-C (the sweep closes its runs and can be resumed).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .errors import SweepError, first_line
from .grid import SweepSpec
from .names import SWEEP_ID
from .settings import JOB_STOP_WAIT_S

# `ray job stop` sends SIGTERM, then SIGKILL after this many seconds: time to close the runs.
STOP_GRACE_S = 60
EXCLUDES = [
    ".git",
    ".venv",
    "mlflow.db",
    "mlflow.db-wal",  # the store's write-ahead log (workflows/sqlite_wal.py)
    "mlflow.db-shm",
    "mlartifacts",
    "mlruns",
    "ca-flow-results",
    "ca-flow-report",
    "*.parquet",
]


def as_flags(spec: SweepSpec) -> list[str]:
    flags = []
    for key, value in spec.record().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif value is not None:
            flags += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def source_checkout() -> Path | None:
    """The repository this ca-flow runs from, if it is a source checkout (the job then ships it)."""
    root = Path(__file__).resolve().parents[1]
    project = root / "pyproject.toml"
    return root if project.is_file() and 'name = "ca-flow"' in project.read_text() else None


def submit(spec: SweepSpec, uri: str, address: str, sweep_id: str) -> str:
    """Submit the sweep to the job API at `address` (http://HEAD:8265); returns the job id."""
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise SweepError(
            f"--submit needs the cluster's job API address, e.g. --address http://HEAD:8265; got {address!r}"
        )
    args = ["sweep", *as_flags(spec), "--tracking-uri", uri, "--sweep-id", sweep_id]
    runtime_env = {"env_vars": {JOB_STOP_WAIT_S.name: str(STOP_GRACE_S), "PYTHONUNBUFFERED": "1"}}
    checkout = source_checkout()
    if checkout:
        runtime_env.update(working_dir=str(checkout), excludes=EXCLUDES)
        entrypoint = shlex.join(["python", "-m", "workflows.cli", *args])
    else:
        entrypoint = shlex.join(["ca-flow", *args])
    try:
        client = JobSubmissionClient(address)
        return client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=f"ca-flow-{sweep_id}",
            metadata={SWEEP_ID: sweep_id},
        )
    except Exception as exc:
        raise SweepError(
            f"cannot submit to the Ray job API at {address}: {first_line(exc)}; is the head "
            f"running (ray start --head)? A token cluster needs its token and token mode here too, see "
            f"cluster/README.md (Token authentication)"
        ) from None
