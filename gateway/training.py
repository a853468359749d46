"""Training jobs at the gateway: the tier's job limit and job GPU-seconds.

A job's GPU-seconds (devices x wall time) are known only when it ends, long
after CreateTrainingJob returned. The gateway bills a job under the ledger id
``job:<job_id>``, so billing it again (here, or on another replica sharing the
ledger) bills nothing. Every job it sees created goes into the store's durable
``training_jobs`` table; a sweeper asks the diffusion service about each
unbilled one every ``job_sweep_s`` and bills it when it has ended, whoever
watches, across gateway restarts. A job seen ended in a Get/List/Cancel/Create
reply, at the end of a Watch, or when GetUsage reconciles is billed at once,
and a new job's budget check first bills the tenant's jobs that have ended.
The tier's limit on jobs at once travels to the diffusion service in
``x-dreamsight-max-training-jobs``, which counts the tenant's queued and
running jobs where they live.

This is the one gateway module that parses diffusion messages (the proxy
otherwise passes bytes); training calls are few, so the parsing is cheap.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import grpc
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc

from gateway.core import Admission, GatewayCore
from gateway.keys import Caller
from gateway.store import AsyncStore, JobRow

log = logging.getLogger(__name__)

MAX_TRAINING_JOBS_HEADER = "x-dreamsight-max-training-jobs"
_ENDED = frozenset(
    {
        diffusion_pb2.JOB_STATE_SUCCEEDED,
        diffusion_pb2.JOB_STATE_FAILED,
        diffusion_pb2.JOB_STATE_CANCELLED,
    }
)
_ACTIVE = frozenset({diffusion_pb2.JOB_STATE_QUEUED, diffusion_pb2.JOB_STATE_RUNNING})
_RESPONSES: dict[str, Any] = {
    "CreateTrainingJob": diffusion_pb2.CreateTrainingJobResponse,
    "GetTrainingJob": diffusion_pb2.GetTrainingJobResponse,
    "ListTrainingJobs": diffusion_pb2.ListTrainingJobsResponse,
    "CancelTrainingJob": diffusion_pb2.CancelTrainingJobResponse,
    "WatchTrainingJob": diffusion_pb2.WatchTrainingJobResponse,
}
TRAINING_METHODS = frozenset(_RESPONSES)
_SWEEP_BATCH = 200  # jobs asked about per round; the next round goes on from there


def _jobs(message: Any) -> list[diffusion_pb2.TrainingJob]:
    if isinstance(message, diffusion_pb2.ListTrainingJobsResponse):
        return list(message.jobs)
    if hasattr(message, "job") and message.HasField("job"):
        return [message.job]
    return []


class TrainingMeter:
    """Bills ended jobs once and tells the backend the tier's job limit."""

    def __init__(
        self, core: GatewayCore, channel: grpc.aio.Channel, store: AsyncStore | None = None
    ) -> None:
        self._core = core
        self._stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        self._store = store
        self._sweep_after: tuple[float, str] = (-1.0, "")

    def metadata(self, admission: Admission) -> tuple[tuple[str, str], ...]:
        """Backend metadata for a training call: the tenant and the tier's job limit."""
        limit = str(admission.tier.training_jobs)
        return (*self._core.backend_metadata(admission), (MAX_TRAINING_JOBS_HEADER, limit))

    async def bill(self, caller: Caller, job: diffusion_pb2.TrainingJob) -> bool:
        """Bill an ended job (once); True when this call billed it."""
        if job.state not in _ENDED or job.usage.gpu_seconds <= 0:
            return False
        budgets = self._core.budgets
        billed = await budgets.record(
            budgets.bill(f"job:{job.job_id}", caller, "DiffusionService", job.usage.gpu_seconds)
        )
        if billed:
            tier = caller.tier
            self._core.metrics.gpu_seconds.labels(tier, "DiffusionService").inc(
                job.usage.gpu_seconds
            )
        return billed

    async def remember(self, caller: Caller, job: diffusion_pb2.TrainingJob) -> None:
        """Note a queued or running job, to bill when it ends."""
        if self._store is not None and job.job_id and job.state in _ACTIVE:
            await self._store.run(
                self._store.sync.remember_job, job.job_id, caller.tenant, caller.tier, time.time()
            )

    async def observe(self, admission: Admission, method: str, payload: bytes) -> None:
        """Look at one reply of a training call; bill any ended job in it."""
        cls = _RESPONSES.get(method)
        if cls is None:
            return
        try:
            message = cls.FromString(payload)
        except Exception:  # a reply we cannot read is not ours to bill
            return
        if isinstance(message, diffusion_pb2.WatchTrainingJobResponse):
            if message.state in _ENDED and message.WhichOneof("event") in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                admission.watched_job_ended = True
            return
        for job in _jobs(message):
            if method == "CreateTrainingJob":
                await self.remember(admission.caller, job)
            await self.bill(admission.caller, job)

    async def after_watch(self, admission: Admission, job_id: str) -> None:
        """A watched job ended: fetch it to learn its GPU-seconds."""
        try:
            reply = await self._stub.GetTrainingJob(
                diffusion_pb2.GetTrainingJobRequest(job_id=job_id),
                metadata=self._core.backend_metadata(admission),
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            log.warning("could not fetch ended job %s: %s", job_id, error.code().name)
            return
        await self.bill(admission.caller, reply.job)

    async def reconcile(self, caller: Caller) -> int:
        """Bill the tenant's ended jobs; return how many are queued or running."""
        metadata = self._core.tenant_metadata(caller.tenant, f"usage-{uuid.uuid4().hex}")
        active = 0
        token = ""
        for _ in range(100):  # at most 100 pages of 1000
            try:
                reply = await self._stub.ListTrainingJobs(
                    diffusion_pb2.ListTrainingJobsRequest(page_size=1000, page_token=token),
                    metadata=metadata,
                    timeout=10,
                )
            except grpc.aio.AioRpcError as error:
                log.info("training jobs unavailable for usage: %s", error.code().name)
                return active
            for job in reply.jobs:
                active += job.state in _ACTIVE
                await self.remember(caller, job)  # e.g. one whose Create reply was lost
                await self.bill(caller, job)
            token = reply.next_page_token
            if not token:
                break
        return active

    async def before_admission(self, method: str, authorization: str | None) -> None:
        """Before CreateTrainingJob's budget check: bill the caller's jobs that have
        ended, so that the check sees them. Errors are left to the admission."""
        if method != "CreateTrainingJob" or self._store is None:
            return
        try:
            caller = await self._core.keys.verify(authorization)
        except Exception:  # the admission refuses it, with its metrics
            return
        jobs = await self._store.run(self._store.sync.unbilled_jobs, caller.tenant)
        await self._settle(jobs)

    async def sweep(self) -> int:
        """One round: ask about each unbilled job (a batch of them), bill the
        ended ones. Returns how many jobs it was done with."""
        if self._store is None:
            return 0
        jobs = await self._store.run(
            self._store.sync.unbilled_jobs, "", self._sweep_after, _SWEEP_BATCH
        )
        # A short batch means the end of the table: the next round starts over.
        self._sweep_after = (
            (jobs[-1].created_at, jobs[-1].job_id) if len(jobs) == _SWEEP_BATCH else (-1.0, "")
        )
        return await self._settle(jobs)

    async def sweep_forever(self, interval_s: float) -> None:
        """Sweep every interval until cancelled; a failed round is logged and retried."""
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("training job sweep failed; retrying in %gs", interval_s)
            await asyncio.sleep(interval_s)

    async def _settle(self, jobs: list[JobRow]) -> int:
        """Bill those of these jobs that have ended; how many are done with.
        Stops at the first backend failure other than NOT_FOUND (it is down:
        the next round tries again)."""
        assert self._store is not None
        done = 0
        for row in jobs:
            metadata = self._core.tenant_metadata(row.tenant, f"sweep-{uuid.uuid4().hex}")
            try:
                reply = await self._stub.GetTrainingJob(
                    diffusion_pb2.GetTrainingJobRequest(job_id=row.job_id),
                    metadata=metadata,
                    timeout=10,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    log.warning(
                        "training job %s of %s is gone from the diffusion service; "
                        "it is not billed",
                        row.job_id,
                        row.tenant,
                    )
                    await self._store.run(self._store.sync.mark_job_billed, row.job_id, time.time())
                    done += 1
                    continue
                log.info("training jobs unavailable for billing: %s", error.code().name)
                break
            if reply.job.state in _ENDED:
                # Billed now, or already (seen ended elsewhere, another replica): done.
                if await self.bill(Caller("", row.tenant, row.tier), reply.job):
                    log.info(
                        "billed training job %s of %s: %.3f GPU-seconds",
                        row.job_id,
                        row.tenant,
                        reply.job.usage.gpu_seconds,
                    )
                await self._store.run(self._store.sync.mark_job_billed, row.job_id, time.time())
                done += 1
        return done


def watched_job_id(payload: bytes) -> str:
    """The job id of a WatchTrainingJob request."""
    try:
        return diffusion_pb2.WatchTrainingJobRequest.FromString(payload).job_id
    except Exception:
        return ""
