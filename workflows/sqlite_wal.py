"""The embedded SQLite store in write-ahead-log mode, committing without a sync each time.

In its default (rollback journal, synchronous FULL) every MLflow commit syncs the database file to
disk, about 10 ms here, and a trial's record takes six commits: the recorder, the sweep's one writer,
spent most of its time waiting on the disk. In WAL mode with synchronous NORMAL a commit appends to
the log; a killed process loses nothing committed, only a power cut can take the last commits.
WAL shares memory through the -shm file, so every process using the store must be on one host: true
of the embedded store (the driver, its recorder on the driver's node, `ca-flow ui`); a store that
several hosts write belongs behind `mlflow server` (mlflow/serve.sh).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def use_wal(db: Path) -> None:
    """Switch the database file to WAL (it stays so for every later connection). Called once the
    schema exists, under the schema lock: the switch needs the file to itself."""
    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


def commit_without_sync() -> None:
    """Every SQLite connection this process opens from now on commits with synchronous NORMAL."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "connect", _synchronous_normal):
        event.listen(Engine, "connect", _synchronous_normal)


def _synchronous_normal(dbapi_connection, _record) -> None:
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")
