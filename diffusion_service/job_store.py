"""The SQLite store of training jobs, their events and fine-tuned models.

One file holds everything a restart must not lose: each job (owner, state,
resolved parameters, progress, GPU-seconds, timestamps, the model name it
reserves), each job's event history (what a late watcher replays), and the
registrations of fine-tuned models, keyed by owner tenant and name (names
are per tenant; schema 1 keyed them by name alone and is migrated on open).
Every change is one transaction (WAL journal), so a crash leaves either the
old or the new state.

The file is created on the first write: a service that never trains leaves
no store behind. Calls are short and synchronous (the service makes them
from its event loop, and the model registry from worker threads), guarded
by one lock. PostgreSQL takes this role at scale (DESIGN.md); the interface
is small on purpose.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_service.domain import (
    CheckpointSaved,
    ClassImagesProgress,
    JobCancelled,
    JobEvent,
    JobEventPayload,
    JobFailed,
    JobQueued,
    JobState,
    JobSucceeded,
    TrainingStep,
    ValidationImage,
)
from diffusion_service.dreambooth.params import JobParams

SCHEMA_VERSION = 2
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
    update_time REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_request
    ON jobs (tenant, client_request_id) WHERE client_request_id <> '';
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, seq);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
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
_ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)
_JOB_FIELDS = {
    "state",
    "step",
    "model",
    "reason",
    "gpu_seconds",
    "attempts",
    "crashes",
    "start_time",
    "end_time",
}


@dataclass(frozen=True)
class StoredJob:
    """One row of the jobs table."""

    seq: int
    job_id: str
    tenant: str
    client_request_id: str
    state: JobState
    params: JobParams
    model_name: str
    """The fine-tuned model's name, reserved from creation on."""
    step: int
    model: str
    reason: str
    gpu_seconds: float
    attempts: int
    crashes: int
    create_time: float
    start_time: float | None
    end_time: float | None


@dataclass(frozen=True)
class SavedModel:
    """A persisted fine-tuned model registration."""

    name: str
    tenant: str
    base_model: str
    job_id: str
    path: str


class JobStore:
    """Jobs, events and fine-tuned models in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None

    def _open(self, create: bool) -> sqlite3.Connection | None:
        if self._conn is None:
            if not create and not self.path.exists():
                return None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                conn.close()
                raise RuntimeError(
                    f"{self.path} has schema {version}, newer than this service's {SCHEMA_VERSION}"
                )
            _migrate_fine_tuned_models(conn)
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._conn = conn
        return self._conn

    @property
    def exists(self) -> bool:
        """Whether the store file exists (it is created by the first write)."""
        return self._conn is not None or self.path.exists()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._open(create=True)
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return []
            return conn.execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        """Close the file (reopened on next use)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # Jobs.

    def insert_job(
        self,
        job_id: str,
        tenant: str,
        client_request_id: str,
        params: JobParams,
        model_name: str,
        first_event: JobEventPayload,
    ) -> JobEvent:
        """Add a queued job and its first event; returns the event.

        Raises sqlite3.IntegrityError when the tenant already used this
        client_request_id (the caller looks the job up first).
        """
        now = time.time()
        with self._write() as db:
            db.execute(
                "INSERT INTO jobs (job_id, tenant, client_request_id, state, params, model_name,"
                " create_time, update_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    tenant,
                    client_request_id,
                    JobState.QUEUED.value,
                    params.to_json(),
                    model_name,
                    now,
                    now,
                ),
            )
            return self._add_event(db, job_id, JobState.QUEUED, first_event, now)

    def get(self, job_id: str) -> StoredJob | None:
        """One job, or None."""
        rows = self._read("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def find_by_request(self, tenant: str, client_request_id: str) -> StoredJob | None:
        """The tenant's job created with this client_request_id, or None."""
        rows = self._read(
            "SELECT * FROM jobs WHERE tenant = ? AND client_request_id = ?",
            (tenant, client_request_id),
        )
        return _job(rows[0]) if rows else None

    def list_jobs(self, tenant: str, limit: int, before_seq: int | None) -> list[StoredJob]:
        """The tenant's jobs, newest first, older than before_seq when given."""
        rows = self._read(
            "SELECT * FROM jobs WHERE tenant = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (tenant, before_seq if before_seq is not None else 2**62, limit),
        )
        return [_job(r) for r in rows]

    def count_active(self, tenant: str) -> int:
        """The tenant's queued plus running jobs."""
        rows = self._read(
            "SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN (?, ?)", (tenant, *_ACTIVE)
        )
        return int(rows[0][0]) if rows else 0

    def in_state(self, state: JobState) -> list[StoredJob]:
        """Every job in a state, oldest first."""
        rows = self._read("SELECT * FROM jobs WHERE state = ? ORDER BY seq", (state.value,))
        return [_job(r) for r in rows]

    def count_state(self, state: JobState) -> int:
        """Jobs in a state."""
        rows = self._read("SELECT COUNT(*) FROM jobs WHERE state = ?", (state.value,))
        return int(rows[0][0]) if rows else 0

    def queue_position(self, job: StoredJob) -> int:
        """Queued jobs created before this one."""
        rows = self._read(
            "SELECT COUNT(*) FROM jobs WHERE state = ? AND seq < ?",
            (JobState.QUEUED.value, job.seq),
        )
        return int(rows[0][0]) if rows else 0

    def name_reserved(self, model_name: str, tenant: str) -> bool:
        """Whether a queued or running job of the tenant will create a model
        of this name (names are per tenant: other tenants' jobs do not count)."""
        rows = self._read(
            "SELECT 1 FROM jobs WHERE tenant = ? AND model_name = ? AND state IN (?, ?) LIMIT 1",
            (tenant, model_name, *_ACTIVE),
        )
        return bool(rows)

    def update(self, job_id: str, **fields: Any) -> None:
        """Change some fields of a job (state as a JobState)."""
        with self._write() as db:
            self._update(db, job_id, fields)

    def record(
        self, job_id: str, state: JobState, payload: JobEventPayload, **fields: Any
    ) -> JobEvent:
        """Append an event and change the job (state included) in one transaction."""
        now = time.time()
        with self._write() as db:
            self._update(db, job_id, {**fields, "state": state})
            return self._add_event(db, job_id, state, payload, now)

    def _update(self, db: sqlite3.Connection, job_id: str, fields: dict[str, Any]) -> None:
        unknown = set(fields) - _JOB_FIELDS
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        values = {k: (v.value if isinstance(v, JobState) else v) for k, v in fields.items()}
        values["update_time"] = time.time()
        columns = ", ".join(f"{k} = ?" for k in values)
        db.execute(f"UPDATE jobs SET {columns} WHERE job_id = ?", (*values.values(), job_id))

    # Events.

    def _add_event(
        self,
        db: sqlite3.Connection,
        job_id: str,
        state: JobState,
        payload: JobEventPayload,
        now: float,
    ) -> JobEvent:
        seq = db.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = ?", (job_id,)
        ).fetchone()[0]
        kind, data, blob = _encode(payload)
        db.execute(
            "INSERT INTO job_events (job_id, seq, time, state, kind, data, blob)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job_id, seq, now, state.value, kind, data, blob),
        )
        return JobEvent(seq=int(seq), time=now, state=state, payload=payload)

    def events(self, job_id: str) -> list[JobEvent]:
        """A job's whole history, in order."""
        rows = self._read(
            "SELECT seq, time, state, kind, data, blob FROM job_events WHERE job_id = ?"
            " ORDER BY seq",
            (job_id,),
        )
        return [
            JobEvent(
                seq=int(r["seq"]),
                time=float(r["time"]),
                state=JobState(r["state"]),
                payload=_decode(r["kind"], r["data"], r["blob"]),
            )
            for r in rows
        ]

    # Fine-tuned models.

    def save_model(self, model: SavedModel) -> None:
        """Persist a registration (replacing a stale one of the same owner and name)."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO fine_tuned_models"
                " (name, tenant, base_model, job_id, path, create_time) VALUES (?, ?, ?, ?, ?, ?)",
                (model.name, model.tenant, model.base_model, model.job_id, model.path, time.time()),
            )

    def delete_model(self, name: str, tenant: str) -> None:
        """Forget the tenant's registration of that name."""
        with self._write() as db:
            db.execute(
                "DELETE FROM fine_tuned_models WHERE tenant = ? AND name = ?", (tenant, name)
            )

    def models(self) -> list[SavedModel]:
        """Every persisted registration, oldest first."""
        rows = self._read(
            "SELECT name, tenant, base_model, job_id, path FROM fine_tuned_models"
            " ORDER BY create_time"
        )
        return [SavedModel(**dict(r)) for r in rows]


def _migrate_fine_tuned_models(conn: sqlite3.Connection) -> None:
    """Re-key schema 1's fine_tuned_models (name alone) by (tenant, name),
    keeping every row; a no-op on a new or already migrated file."""
    columns = conn.execute("PRAGMA table_info(fine_tuned_models)").fetchall()
    keyed_by = [c["name"] for c in sorted(columns, key=lambda c: c["pk"]) if c["pk"]]
    if not columns or keyed_by == ["tenant", "name"]:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("ALTER TABLE fine_tuned_models RENAME TO fine_tuned_models_v1")
        conn.execute(_FINE_TUNED_MODELS)
        conn.execute(
            "INSERT INTO fine_tuned_models (name, tenant, base_model, job_id, path, create_time)"
            " SELECT name, tenant, base_model, job_id, path, create_time FROM fine_tuned_models_v1"
        )
        conn.execute("DROP TABLE fine_tuned_models_v1")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _job(row: sqlite3.Row) -> StoredJob:
    return StoredJob(
        seq=int(row["seq"]),
        job_id=row["job_id"],
        tenant=row["tenant"],
        client_request_id=row["client_request_id"],
        state=JobState(row["state"]),
        params=JobParams.from_json(row["params"]),
        model_name=row["model_name"],
        step=int(row["step"]),
        model=row["model"],
        reason=row["reason"],
        gpu_seconds=float(row["gpu_seconds"]),
        attempts=int(row["attempts"]),
        crashes=int(row["crashes"]),
        create_time=float(row["create_time"]),
        start_time=row["start_time"],
        end_time=row["end_time"],
    )


_KINDS: dict[str, type[Any]] = {
    "queued": JobQueued,
    "class_images": ClassImagesProgress,
    "training_step": TrainingStep,
    "checkpoint_saved": CheckpointSaved,
    "validation_image": ValidationImage,
    "succeeded": JobSucceeded,
    "failed": JobFailed,
    "cancelled": JobCancelled,
}
_NAMES = {cls: kind for kind, cls in _KINDS.items()}


def _encode(payload: JobEventPayload) -> tuple[str, str, bytes | None]:
    kind = _NAMES[type(payload)]
    if isinstance(payload, ValidationImage):
        return kind, json.dumps({"step": payload.step}), payload.png
    return kind, json.dumps(payload.__dict__), None


def _decode(kind: str, data: str, blob: bytes | None) -> JobEventPayload:
    cls = _KINDS[kind]
    fields = json.loads(data)
    if cls is ValidationImage:
        return ValidationImage(step=int(fields["step"]), png=bytes(blob or b""))
    payload: JobEventPayload = cls(**fields)
    return payload
