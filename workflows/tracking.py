"""The tracking store: where runs go (the URI), whether the store answers, and a client on it.

The experiment and its view are set up in experiments.py, trial runs written in trial_runs.py, the
parent run in parent_run.py, and runs found again with run_search.py.
"""

from __future__ import annotations

import fcntl
import os
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from . import settings, sqlite_wal
from .errors import TrackingError, first_line

SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")


def resolve_uri(uri: str | None = None) -> str:
    """--tracking-uri (or MLFLOW_TRACKING_URI), else ./mlflow.db, SQLite paths made absolute."""
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Relative SQLite paths would resolve inside each Ray trial's own working directory.
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def check_form(uri: str) -> None:
    """Refuse a URI MLflow cannot use, before anything starts; reads nothing."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme not in SCHEMES:
        raise TrackingError(
            f"tracking URI {uri!r} is not one ca-flow can use; pass sqlite:///path/mlflow.db, "
            f"http://host:5000 (mlflow/serve.sh) or a database URI "
            f"({', '.join(s + '://' for s in SCHEMES[3:])}...)"
        )


def unreachable(url: str, timeout: float) -> str | None:
    """Why the MLflow server at `url` does not answer its /health probe; None when it does."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as answer:
            answer.read()
        return None
    except OSError as exc:  # URLError, HTTPError (an answer other than 2xx) and timeouts are OSErrors
        return str(getattr(exc, "reason", exc))


def check(uri: str, must_exist: bool = False) -> None:
    """Fail with one clear line if the store cannot be reached; writes nothing."""
    check_form(uri)
    if uri.startswith(("http://", "https://")):
        reason = unreachable(uri, timeout=5)
        if reason is not None:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                f"(mlflow/serve.sh) or pass another --tracking-uri"
            )
    db = sqlite_path(uri)
    if db is not None:
        if not db.parent.is_dir():
            raise TrackingError(
                f"folder {db.parent} for the SQLite tracking store does not exist; create it "
                f"or pass another --tracking-uri"
            )
        if must_exist and not db.is_file():
            raise TrackingError(
                f"no MLflow store at {db}; run `ca-flow sweep` here first or pass --tracking-uri"
            )
        if db.is_file() and db.stat().st_size and not _header(db).startswith(b"SQLite format 3"):
            raise TrackingError(
                f"{db} is not an SQLite database; move it away or pass another --tracking-uri"
            )


def _header(db: Path) -> bytes:
    with db.open("rb") as f:
        return f.read(16)


@contextmanager
def _schema_lock(uri: str):
    """Creating a fresh SQLite schema from several processes at once races (alembic); take turns."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_mlflow() -> None:
    """MLflow's modules, ahead of `connect`: a sweep loads them while Ray starts."""
    from mlflow.store.tracking import sqlalchemy_store  # noqa: F401  (and mlflow with it)


def connect(uri: str, must_exist: bool = False):
    """A client on a store that answers and has its schema; fails with one clear line otherwise."""
    import logging

    import mlflow
    from mlflow import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating tables..." is no news
    settings.for_mlflow()
    check(uri, must_exist)
    sqlite_wal.commit_without_sync()
    try:
        with _schema_lock(uri):
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
            if sqlite_path(uri) is not None:
                sqlite_wal.use_wal(sqlite_path(uri))
    except Exception as exc:
        raise TrackingError(f"cannot use MLflow tracking store {uri}: {first_line(exc)}") from None
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # registry calls resolve models:/ URIs through the global store
    # ...and set_tracking_uri exports it too: the next command in this process (a notebook, a test)
    # would silently take this store for its own default.
    if exported is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = exported
    return client
