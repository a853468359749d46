"""The job store in one SQLite file: the embedded default, for one replica.

The file is created on the first write (a service that never trains leaves
no store behind) and uses a WAL journal; writes take SQLite's write lock
(``BEGIN IMMEDIATE``), so claims need no row locks. One connection, guarded
by a lock, serves the event loop and the registry's worker threads. Changes
reach subscribers in this process only: a SQLite store has one replica.

Schema 1 keyed fine-tuned models by name alone; schema 2 by tenant and name;
schema 3 adds leases and per-job event numbering. Each is migrated on open.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffusion_service.jobs.sql_store import Execute, Row, SqlJobStore
from diffusion_service.jobs.store import Change

SCHEMA_VERSION = 3
# How long a writer waits for another replica's (or store's) write lock.
BUSY_SECONDS = 10.0
_FINE_TUNED_MODELS = """
CREATE TABLE IF NOT EXISTS fine_tuned_models (
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    base_model TEXT NOT NULL,
    job_id TEXT NOT NULL,
    path TEXT NOT NULL,
    create_time REAL NOT NULL,
    PRIMARY KEY (tenant, name)
)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    client_request_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    model_name TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    model TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    gpu_seconds REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    crashes INTEGER NOT NULL DEFAULT 0,
    create_time REAL NOT NULL,
    start_time REAL,
    end_time REAL,
    update_time REAL NOT NULL,
    lease_owner TEXT,
    lease_expires REAL,
    event_seq INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_request
    ON jobs (tenant, client_request_id) WHERE client_request_id <> '';
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, seq);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
-- A model name is reserved by at most one active job of its tenant.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_reserving_names ON jobs (tenant, model_name)
        WHERE state IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    state TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    blob BLOB,
    PRIMARY KEY (job_id, seq)
);
{_FINE_TUNED_MODELS};
"""
_LEASE_COLUMNS = {
    "lease_owner": "TEXT",
    "lease_expires": "REAL",
    "event_seq": "INTEGER NOT NULL DEFAULT 0",
}


class SqliteJobStore(SqlJobStore):
    """Jobs, events and fine-tuned models in one SQLite file."""

    NOW = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def _open(self, create: bool) -> sqlite3.Connection | None:
        if self._conn is None:
            if not create and not self.path.exists():
                return None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=BUSY_SECONDS, check_same_thread=False, isolation_level=None
            )
            conn.row_factory = sqlite3.Row
            try:
                _use_wal(conn)
                conn.execute("PRAGMA synchronous=NORMAL")
                _set_up(conn, self.path)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    @property
    def exists(self) -> bool:
        """Whether the store file exists (it is created by the first write)."""
        return self._conn is not None or self.path.exists()

    @contextmanager
    def _write(self) -> Iterator[tuple[Execute, list[Change]]]:
        changes: list[Change] = []
        with self._lock:
            conn = self._open(create=True)
            assert conn is not None

            def execute(sql: str, args: Sequence[Any]) -> list[Row]:
                return conn.execute(sql, tuple(args)).fetchall()

            conn.execute("BEGIN IMMEDIATE")
            try:
                yield execute, changes
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        self._announce(changes)

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return []
            return conn.execute(sql, tuple(args)).fetchall()

    def _is_duplicate(self, error: Exception) -> bool:
        return isinstance(error, sqlite3.IntegrityError)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to a WAL journal. SQLite answers BUSY here without
    waiting on its busy handler while another connection opens the same new
    file, so the switch is retried until the busy timeout."""
    deadline = time.monotonic() + BUSY_SECONDS
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _set_up(conn: sqlite3.Connection, path: Path) -> None:
    """Check the schema's version, migrate and create, in one write
    transaction, so stores opening one file at once never race a migration."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{path} has schema {version}, newer than this service's {SCHEMA_VERSION}"
            )
        _migrate_fine_tuned_models(conn)
        _add_lease_columns(conn)
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _migrate_fine_tuned_models(conn: sqlite3.Connection) -> None:
    """Re-key schema 1's fine_tuned_models (name alone) by (tenant, name),
    keeping every row; a no-op on a new or already migrated file."""
    columns = conn.execute("PRAGMA table_info(fine_tuned_models)").fetchall()
    keyed_by = [c["name"] for c in sorted(columns, key=lambda c: c["pk"]) if c["pk"]]
    if not columns or keyed_by == ["tenant", "name"]:
        return
    conn.execute("ALTER TABLE fine_tuned_models RENAME TO fine_tuned_models_v1")
    conn.execute(_FINE_TUNED_MODELS)
    conn.execute(
        "INSERT INTO fine_tuned_models (name, tenant, base_model, job_id, path, create_time)"
        " SELECT name, tenant, base_model, job_id, path, create_time FROM fine_tuned_models_v1"
    )
    conn.execute("DROP TABLE fine_tuned_models_v1")


def _add_lease_columns(conn: sqlite3.Connection) -> None:
    """Schema 2 to 3: lease columns, and each job's event count in event_seq."""
    present = {c["name"] for c in conn.execute("PRAGMA table_info(jobs)").fetchall()}
    if not present or "event_seq" in present:
        return
    for name, kind in _LEASE_COLUMNS.items():
        conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
    conn.execute(
        "UPDATE jobs SET event_seq = (SELECT COALESCE(MAX(seq), 0) FROM job_events"
        " WHERE job_events.job_id = jobs.job_id)"
    )
