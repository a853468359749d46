"""What the diffusion servicer needs for DreamBooth training jobs."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from diffusion_service.domain import JobEvent, TrainingInput, TrainingJobInfo


class TrainingEngine(Protocol):
    """What the diffusion servicer needs for DreamBooth jobs.

    Every call works from any replica sharing the job store, whichever
    replica runs the job. Another tenant's job is NotFound everywhere, never
    PermissionDenied: callers cannot tell it from a job that does not exist.
    """

    async def create_job(
        self, request: TrainingInput, tenant: str, max_jobs: int | None
    ) -> TrainingJobInfo:
        """Queue a job (or return the tenant's job with the same client_request_id).

        ``max_jobs`` caps the tenant's queued plus running jobs
        (ResourceExhausted beyond it); None is no cap.
        """
        ...

    def get_job(self, job_id: str, tenant: str) -> TrainingJobInfo:
        """One of the tenant's jobs."""
        ...

    def list_jobs(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[TrainingJobInfo], str]:
        """A page of the tenant's jobs, newest first, and the next page's token."""
        ...

    def watch_job(self, job_id: str, tenant: str) -> AsyncGenerator[JobEvent, None]:
        """The job's history, then its events as they happen, to its last."""
        ...

    async def cancel_job(self, job_id: str, tenant: str) -> TrainingJobInfo:
        """Cancel a queued or running job; an ended job is returned as it is."""
        ...
