"""Training jobs at the gateway: the tier's job limit and job GPU-seconds.

A job's GPU-seconds (devices x wall time) are known only when it ends, long
after CreateTrainingJob returned. The gateway bills a job the first time it
sees it ended (in a Get/List/Cancel/Create reply, at the end of a Watch, or
when GetUsage reconciles the tenant's jobs), under the ledger id
``job:<job_id>``, so seeing it again bills nothing. The tier's limit on jobs at
once travels to the diffusion service in ``x-dreamsight-max-training-jobs``,
which counts the tenant's queued and running jobs where they live.

This is the one gateway module that parses diffusion messages (the proxy
otherwise passes bytes); training calls are few, so the parsing is cheap.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import grpc
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc

from gateway.core import Admission, GatewayCore
from gateway.keys import Caller

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


def _jobs(message: Any) -> list[diffusion_pb2.TrainingJob]:
    if isinstance(message, diffusion_pb2.ListTrainingJobsResponse):
        return list(message.jobs)
    if hasattr(message, "job") and message.HasField("job"):
        return [message.job]
    return []


class TrainingMeter:
    """Bills ended jobs once and tells the backend the tier's job limit."""

    def __init__(self, core: GatewayCore, channel: grpc.aio.Channel) -> None:
        self._core = core
        self._stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)

    def metadata(self, admission: Admission) -> tuple[tuple[str, str], ...]:
        """Backend metadata for a training call: the tenant and the tier's job limit."""
        limit = str(admission.tier.training_jobs)
        return (*self._core.backend_metadata(admission), (MAX_TRAINING_JOBS_HEADER, limit))

    async def bill(self, caller: Caller, job: diffusion_pb2.TrainingJob) -> None:
        """Bill an ended job (once)."""
        if job.state in _ENDED and job.usage.gpu_seconds > 0:
            billed = await self._core.budgets.record(
                f"job:{job.job_id}", caller, "DiffusionService", job.usage.gpu_seconds
            )
            if billed:
                tier = caller.tier
                self._core.metrics.gpu_seconds.labels(tier, "DiffusionService").inc(
                    job.usage.gpu_seconds
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
                await self.bill(caller, job)
            token = reply.next_page_token
            if not token:
                break
        return active


def watched_job_id(payload: bytes) -> str:
    """The job id of a WatchTrainingJob request."""
    try:
        return diffusion_pb2.WatchTrainingJobRequest.FromString(payload).job_id
    except Exception:
        return ""
