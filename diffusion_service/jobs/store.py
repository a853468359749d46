"""The job store: one interface, a SQLite file or a PostgreSQL database behind it.

The store holds everything a restart or a lost replica must not lose: each
job (owner, state, resolved parameters, progress, GPU-seconds, timestamps,
the model name it reserves, and the lease of the replica running it), each
job's event history in order (what a late watcher replays), and the
registrations of fine-tuned models, keyed by owner tenant and name.

:func:`open_store` picks the implementation from ``--training-store``: a
path is a SQLite file (the embedded default: one replica on one machine), a
``postgresql://`` URL is a PostgreSQL database any number of replicas share.
Both run the same SQL (:mod:`diffusion_service.jobs.sql_store`); they differ
in how claims are locked and how changes reach other replicas (PostgreSQL's
LISTEN/NOTIFY; within one process for SQLite).

Leases: a replica claims queued jobs (and running jobs whose lease expired:
their replica is gone) with :meth:`JobStore.claim`, renews its leases while
it trains, and writes a running job's progress only while it holds the lease,
so a job never has two runners and a replica that lost a job cannot write to
it. Lease times are the database's clock, so replicas' clocks need not agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from diffusion_service.domain import JobEvent, JobEventPayload, JobState
from diffusion_service.dreambooth.params import JobParams

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class StoredJob:
    """One job as stored."""

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
    lease_owner: str | None
    """The replica that runs it (while running)."""


@dataclass(frozen=True)
class Claimed:
    """A job a replica just claimed."""

    job: StoredJob
    taken_over: bool
    """Its lease had expired: the replica that ran it is gone (counted as a crash)."""


@dataclass(frozen=True)
class SavedModel:
    """A persisted fine-tuned model registration."""

    name: str
    tenant: str
    base_model: str
    job_id: str
    path: str


@dataclass(frozen=True)
class Change:
    """Something happened to a job (sent to every replica's subscribers)."""

    job_id: str
    state: JobState


class TooManyJobs(Exception):
    """The tenant already has ``active`` queued or running jobs, its limit."""

    def __init__(self, active: int) -> None:
        super().__init__(f"{active} active jobs")
        self.active = active


class DuplicateRequest(Exception):
    """The tenant already created a job with this client_request_id."""


class NameTaken(Exception):
    """Another queued or running job of the tenant will create a model of this name."""


class JobStore(Protocol):
    """Jobs, their events and fine-tuned models, shared by every replica.

    Calls are short and synchronous and safe from any thread.
    """

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
        """Add a queued job and its first event.

        Raises :class:`TooManyJobs` when the tenant has ``max_active`` queued
        or running jobs (counted atomically across replicas),
        :class:`DuplicateRequest` when it used this client_request_id and
        :class:`NameTaken` when another of its active jobs reserves the name.
        """
        ...

    def get(self, job_id: str) -> StoredJob | None:
        """One job, or None."""
        ...

    def find_by_request(self, tenant: str, client_request_id: str) -> StoredJob | None:
        """The tenant's job created with this client_request_id, or None."""
        ...

    def list_jobs(self, tenant: str, limit: int, before_seq: int | None) -> list[StoredJob]:
        """The tenant's jobs, newest first, older than before_seq when given."""
        ...

    def in_state(self, state: JobState) -> list[StoredJob]:
        """Every job in a state, oldest first."""
        ...

    def count_state(self, state: JobState) -> int:
        """Jobs in a state."""
        ...

    def queue_position(self, job: StoredJob) -> int:
        """Queued jobs created before this one."""
        ...

    def name_reserved(self, model_name: str, tenant: str) -> bool:
        """Whether a queued or running job of the tenant will create a model of this name."""
        ...

    def update(self, job_id: str, **fields: Any) -> None:
        """Change some fields of a job (not its state: that takes an event)."""
        ...

    def record(
        self,
        job_id: str,
        state: JobState,
        payload: JobEventPayload,
        *,
        holder: str | None = None,
        **fields: Any,
    ) -> JobEvent | None:
        """Append an event and change the job (state included) in one transaction.

        A job that has ended takes no more events: None. With ``holder``, the
        event is written only while that replica holds the job's lease (None
        otherwise). Every replica's subscribers hear of it.
        """
        ...

    def events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        """A job's events after ``after_seq``, in order."""
        ...

    def claim(self, owner: str, lease_s: float, limit: int) -> list[Claimed]:
        """Claim up to ``limit`` jobs, oldest first: queued ones, and running
        ones whose lease (another owner's) expired. Each becomes RUNNING under
        ``owner``'s lease; racing claimers never get the same job."""
        ...

    def renew(self, owner: str, job_ids: list[str], lease_s: float) -> set[str]:
        """Extend ``owner``'s leases; returns the jobs it still holds (running
        and leased by it). A job missing from the answer was cancelled or
        taken over: its worker must stop."""
        ...

    def subscribe(self, callback: Callable[[Change], None]) -> None:
        """Call ``callback`` (from any thread) for every job change on any
        replica; a Change with job_id "" means "changes may have been missed,
        look again"."""
        ...

    def save_model(self, model: SavedModel) -> None:
        """Persist a registration (replacing a stale one of the same owner and name)."""
        ...

    def delete_model(self, name: str, tenant: str) -> None:
        """Forget the tenant's registration of that name."""
        ...

    def models(self) -> list[SavedModel]:
        """Every persisted registration, oldest first."""
        ...

    def find_model(self, name: str, tenant: str) -> SavedModel | None:
        """The tenant's registration of that name, or None."""
        ...

    @property
    def shared(self) -> bool:
        """Whether other replicas may use this store (leases then decide who runs what)."""
        ...

    def close(self) -> None:
        """Release connections (reopened on next use) and stop notifying."""
        ...


def open_store(location: Path | str) -> JobStore:
    """The store at ``--training-store``: a SQLite path or a PostgreSQL URL."""
    text = str(location)
    if text.startswith(POSTGRES_SCHEMES):
        from diffusion_service.jobs.postgres_store import PostgresJobStore

        return PostgresJobStore(text)
    from diffusion_service.jobs.sqlite_store import SqliteJobStore

    return SqliteJobStore(Path(location))


def parse_location(text: str) -> Path | str:
    """A ``--training-store`` value: a PostgreSQL URL as is, else a path."""
    if text.startswith(POSTGRES_SCHEMES):
        return text
    if "://" in text:
        raise ValueError(f"{text!r}: expected a file path or a postgresql:// URL")
    if not text.strip():
        raise ValueError("expected a file path or a postgresql:// URL")
    return Path(text)
