"""The job store's SQL, shared by its SQLite and PostgreSQL implementations.

:class:`SqlJobStore` implements :class:`diffusion_service.jobs.store.JobStore`
once; a subclass supplies the connection, the transaction, the dialect's few
differences (the database clock, row locks for claims, a per-tenant lock)
and how a change reaches subscribers. Every change is one transaction, so a
crash leaves either the old or the new state. Statements are written with
``?`` placeholders (PostgreSQL's subclass turns them into ``%s``).

A job's events are numbered 1, 2, ... by its row's ``event_seq``, bumped by
the same UPDATE that changes the job: that UPDATE locks the row, so two
replicas writing to one job at once (a cancel and a training step) get
consecutive numbers, never the same one.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
from diffusion_service.jobs.store import (
    Change,
    Claimed,
    DuplicateRequest,
    NameTaken,
    SavedModel,
    StoredJob,
    TooManyJobs,
)

Row = Any
"""A result row, indexable by column name (sqlite3.Row or a psycopg dict row)."""
Execute = Callable[[str, Sequence[Any]], list[Row]]

_ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)
_ENDED = tuple(s.value for s in JobState if s.terminal)
_JOB_FIELDS = {
    "step",
    "model",
    "reason",
    "gpu_seconds",
    "attempts",
    "crashes",
    "start_time",
    "end_time",
    "lease_owner",
    "lease_expires",
}
_FAR_FUTURE = 2**62


class SqlJobStore:
    """The store's logic over a subclass's connection (see the module docstring)."""

    NOW = ""
    """SQL for the database clock in seconds since the epoch."""
    SKIP_LOCKED = ""
    """Appended to the claim's SELECT: skip rows another claimer holds."""
    shared = False

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._subscribers: list[Callable[[Change], None]] = []

    # What a subclass supplies.

    @contextmanager
    def _write(self) -> Iterator[tuple[Execute, list[Change]]]:
        """One transaction: an execute function and the changes to announce."""
        raise NotImplementedError
        yield  # pragma: no cover

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        raise NotImplementedError

    def _lock_tenant(self, execute: Execute, tenant: str) -> None:
        """Serialize job creation per tenant until the transaction ends."""

    def _is_duplicate(self, error: Exception) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def subscribe(self, callback: Callable[[Change], None]) -> None:
        self._subscribers.append(callback)

    def _announce(self, changes: list[Change]) -> None:
        for change in changes:
            for callback in list(self._subscribers):
                callback(change)

    # Jobs.

    def insert_job(
        self,
        job_id: str,
        tenant: str,
        client_request_id: str,
        params: JobParams,
        model_name: str,
        first_event: JobEventPayload,
        max_active: int | None,
    ) -> JobEvent:
        now = time.time()
        try:
            with self._write() as (execute, changes):
                self._lock_tenant(execute, tenant)
                if max_active is not None:
                    rows = execute(
                        "SELECT COUNT(*) AS n FROM jobs WHERE tenant = ? AND state IN (?, ?)",
                        (tenant, *_ACTIVE),
                    )
                    active = int(rows[0]["n"])
                    if active >= max_active:
                        raise TooManyJobs(active)
                execute(
                    "INSERT INTO jobs (job_id, tenant, client_request_id, state, params,"
                    " model_name, event_seq, create_time, update_time)"
                    " VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)",
                    (job_id, tenant, client_request_id, JobState.QUEUED.value,
                     params.to_json(), model_name, now, now),
                )  # fmt: skip
                event = _add_event(execute, job_id, 1, JobState.QUEUED, first_event, now)
                changes.append(Change(job_id, JobState.QUEUED))
                return event
        except Exception as error:
            if not self._is_duplicate(error):
                raise
            if client_request_id and self.find_by_request(tenant, client_request_id):
                raise DuplicateRequest(client_request_id) from error
            raise NameTaken(model_name) from error

    def get(self, job_id: str) -> StoredJob | None:
        rows = self._read("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def find_by_request(self, tenant: str, client_request_id: str) -> StoredJob | None:
        rows = self._read(
            "SELECT * FROM jobs WHERE tenant = ? AND client_request_id = ?",
            (tenant, client_request_id),
        )
        return _job(rows[0]) if rows else None

    def list_jobs(self, tenant: str, limit: int, before_seq: int | None) -> list[StoredJob]:
        rows = self._read(
            "SELECT * FROM jobs WHERE tenant = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (tenant, before_seq if before_seq is not None else _FAR_FUTURE, limit),
        )
        return [_job(r) for r in rows]

    def in_state(self, state: JobState) -> list[StoredJob]:
        rows = self._read("SELECT * FROM jobs WHERE state = ? ORDER BY seq", (state.value,))
        return [_job(r) for r in rows]

    def count_state(self, state: JobState) -> int:
        rows = self._read("SELECT COUNT(*) AS n FROM jobs WHERE state = ?", (state.value,))
        return int(rows[0]["n"]) if rows else 0

    def queue_position(self, job: StoredJob) -> int:
        rows = self._read(
            "SELECT COUNT(*) AS n FROM jobs WHERE state = ? AND seq < ?",
            (JobState.QUEUED.value, job.seq),
        )
        return int(rows[0]["n"]) if rows else 0

    def name_reserved(self, model_name: str, tenant: str) -> bool:
        rows = self._read(
            "SELECT 1 AS x FROM jobs WHERE tenant = ? AND model_name = ? AND state IN (?, ?)"
            " LIMIT 1",
            (tenant, model_name, *_ACTIVE),
        )
        return bool(rows)

    def update(self, job_id: str, **fields: Any) -> None:
        columns, values = _assignments(fields)
        with self._write() as (execute, _):
            execute(f"UPDATE jobs SET {columns} WHERE job_id = ?", (*values, job_id))

    def record(
        self,
        job_id: str,
        state: JobState,
        payload: JobEventPayload,
        *,
        holder: str | None = None,
        **fields: Any,
    ) -> JobEvent | None:
        columns, values = _assignments(fields)
        condition, extra = "state NOT IN (?, ?, ?)", list(_ENDED)
        if holder is not None:
            condition, extra = "state = ? AND lease_owner = ?", [JobState.RUNNING.value, holder]
        now = time.time()
        with self._write() as (execute, changes):
            rows = execute(
                f"UPDATE jobs SET event_seq = event_seq + 1, state = ?, {columns}"
                f" WHERE job_id = ? AND {condition} RETURNING event_seq",
                (state.value, *values, job_id, *extra),
            )
            if not rows:
                return None
            event = _add_event(execute, job_id, int(rows[0]["event_seq"]), state, payload, now)
            changes.append(Change(job_id, state))
            return event

    def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        rows = self._read(
            "SELECT seq, time, state, kind, data, blob FROM job_events"
            " WHERE job_id = ? AND seq > ? ORDER BY seq",
            (job_id, after_seq),
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

    # Leases.

    def claim(self, owner: str, lease_s: float, limit: int) -> list[Claimed]:
        if limit <= 0:
            return []
        now = time.time()
        queued, running = JobState.QUEUED.value, JobState.RUNNING.value
        claimed: list[Claimed] = []
        with self._write() as (execute, changes):
            # Never our own lapsed lease: renewing it (the job is still ours
            # unless another replica took it) is how a slow replica recovers.
            picked = execute(
                "SELECT job_id, state FROM jobs WHERE state = ?"
                f" OR (state = ? AND lease_expires < {self.NOW} AND lease_owner <> ?)"
                f" ORDER BY seq LIMIT ?{self.SKIP_LOCKED}",
                (queued, running, owner, limit),
            )
            for row in picked:
                taken_over = row["state"] == running
                # The WHERE repeats the test: a claimer that raced us past a
                # lock-free SELECT (SQLite has none) finds no row to update.
                rows = execute(
                    f"UPDATE jobs SET state = ?, lease_owner = ?, lease_expires = {self.NOW} + ?,"
                    " attempts = attempts + 1, crashes = crashes + ?,"
                    " start_time = COALESCE(start_time, ?), update_time = ?"
                    " WHERE job_id = ?"
                    f" AND (state = ? OR (state = ? AND lease_expires < {self.NOW}))"
                    " RETURNING *",
                    (running, owner, lease_s, int(taken_over), now, now,
                     row["job_id"], queued, running),
                )  # fmt: skip
                if rows:
                    claimed.append(Claimed(_job(rows[0]), taken_over))
                    changes.append(Change(row["job_id"], JobState.RUNNING))
        return claimed

    def renew(self, owner: str, job_ids: list[str], lease_s: float) -> set[str]:
        if not job_ids:
            return set()
        marks = ", ".join("?" for _ in job_ids)
        with self._write() as (execute, _):
            rows = execute(
                f"UPDATE jobs SET lease_expires = {self.NOW} + ?"
                f" WHERE lease_owner = ? AND state = ? AND job_id IN ({marks}) RETURNING job_id",
                (lease_s, owner, JobState.RUNNING.value, *job_ids),
            )
        return {str(r["job_id"]) for r in rows}

    # Fine-tuned models.

    def save_model(self, model: SavedModel) -> None:
        with self._write() as (execute, _):
            execute(
                "INSERT INTO fine_tuned_models"
                " (name, tenant, base_model, job_id, path, create_time) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, name) DO UPDATE SET"
                " base_model = excluded.base_model, job_id = excluded.job_id,"
                " path = excluded.path, create_time = excluded.create_time",
                (model.name, model.tenant, model.base_model, model.job_id, model.path, time.time()),
            )

    def delete_model(self, name: str, tenant: str) -> None:
        with self._write() as (execute, _):
            execute("DELETE FROM fine_tuned_models WHERE tenant = ? AND name = ?", (tenant, name))

    def find_model(self, name: str, tenant: str) -> SavedModel | None:
        rows = self._read(
            "SELECT name, tenant, base_model, job_id, path FROM fine_tuned_models"
            " WHERE tenant = ? AND name = ?",
            (tenant, name),
        )
        return _model(rows[0]) if rows else None

    def models(self) -> list[SavedModel]:
        rows = self._read(
            "SELECT name, tenant, base_model, job_id, path FROM fine_tuned_models"
            " ORDER BY create_time"
        )
        return [_model(r) for r in rows]


def _model(row: Row) -> SavedModel:
    return SavedModel(row["name"], row["tenant"], row["base_model"], row["job_id"], row["path"])


def _assignments(fields: dict[str, Any]) -> tuple[str, list[Any]]:
    unknown = set(fields) - _JOB_FIELDS
    if unknown:
        raise ValueError(f"unknown job fields {sorted(unknown)}")
    values = {**fields, "update_time": time.time()}
    return ", ".join(f"{k} = ?" for k in values), list(values.values())


def _add_event(
    execute: Execute,
    job_id: str,
    seq: int,
    state: JobState,
    payload: JobEventPayload,
    now: float,
) -> JobEvent:
    kind, data, blob = _encode(payload)
    execute(
        "INSERT INTO job_events (job_id, seq, time, state, kind, data, blob)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (job_id, seq, now, state.value, kind, data, blob),
    )
    return JobEvent(seq=seq, time=now, state=state, payload=payload)


def _job(row: Row) -> StoredJob:
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
        lease_owner=row["lease_owner"],
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
