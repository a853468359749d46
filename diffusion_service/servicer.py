"""DiffusionService over gRPC: validate -> convert -> engine -> convert.

Generation goes to an :class:`ImageEngine`, DreamBooth jobs to a
:class:`TrainingEngine`; both see the tenant the gateway vouches for. The
gateway passes the tenant tier's limit on training jobs at once in
``x-dreamsight-max-training-jobs``; without it there is no limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc

from diffusion_service import convert
from diffusion_service.config import DiffusionSettings
from diffusion_service.domain import GenerateDone
from diffusion_service.engine import ImageEngine
from diffusion_service.jobs.engine import TrainingEngine
from diffusion_service.metrics import DiffusionMetrics
from dreamsight_server.errors import ErrorTable, InvalidArgument
from dreamsight_server.metadata import MAX_TRAINING_JOBS_HEADER, gpu_seconds_trailer
from dreamsight_server.tenancy import tenant_from_metadata

Context = grpc.aio.ServicerContext[Any, Any]


class DiffusionServicer(diffusion_pb2_grpc.DiffusionServiceServicer):
    """Thin transport: generation over an :class:`ImageEngine`, DreamBooth jobs over a
    :class:`TrainingEngine`."""

    def __init__(
        self,
        engine: ImageEngine,
        training: TrainingEngine,
        settings: DiffusionSettings,
        metrics: DiffusionMetrics,
        errors: ErrorTable,
    ) -> None:
        self._engine = engine
        self._training = training
        self._settings = settings
        self._metrics = metrics
        self._errors = errors

    def _tenant(self, context: Context) -> str:
        return tenant_from_metadata(
            context.invocation_metadata(), self._settings.gateway_secret or None
        )

    @contextlib.contextmanager
    def _counted(self, method: str) -> Iterator[None]:
        outcome = "ok"
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except Exception as error:
            outcome = self._errors.code_for(error).name.lower()
            raise
        finally:
            self._metrics.requests.labels(method, outcome).inc()

    async def Generate(
        self, request: diffusion_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[diffusion_pb2.GenerateResponse]:
        with self._counted("Generate"):
            tenant = self._tenant(context)
            generate = convert.generate_input(request, self._settings.limits)
            async with contextlib.aclosing(self._engine.generate(generate, tenant)) as events:
                async for event in events:
                    if isinstance(event, GenerateDone):
                        context.set_trailing_metadata(gpu_seconds_trailer(event.gpu_seconds))
                    yield convert.generate_response(event)

    async def ListModels(
        self, request: diffusion_pb2.ListModelsRequest, context: Context
    ) -> diffusion_pb2.ListModelsResponse:
        with self._counted("ListModels"):
            return convert.list_models_response(self._engine.list_models(self._tenant(context)))

    async def DeleteModel(
        self, request: diffusion_pb2.DeleteModelRequest, context: Context
    ) -> diffusion_pb2.DeleteModelResponse:
        with self._counted("DeleteModel"):
            tenant = self._tenant(context)
            # Deleting a fine-tuned model removes its files: off the event loop.
            await asyncio.to_thread(self._engine.delete_model, request.name, tenant)
            return diffusion_pb2.DeleteModelResponse()

    async def CreateTrainingJob(
        self, request: diffusion_pb2.CreateTrainingJobRequest, context: Context
    ) -> diffusion_pb2.CreateTrainingJobResponse:
        with self._counted("CreateTrainingJob"):
            tenant = self._tenant(context)
            max_jobs = _max_training_jobs(context)
            # Decoding the images to check them takes a while: off the event loop.
            create = await asyncio.to_thread(
                convert.training_input, request, self._settings.training.limits
            )
            job = await self._training.create_job(create, tenant, max_jobs)
            return diffusion_pb2.CreateTrainingJobResponse(job=convert.training_job(job))

    async def GetTrainingJob(
        self, request: diffusion_pb2.GetTrainingJobRequest, context: Context
    ) -> diffusion_pb2.GetTrainingJobResponse:
        with self._counted("GetTrainingJob"):
            job = self._training.get_job(request.job_id, self._tenant(context))
            return diffusion_pb2.GetTrainingJobResponse(job=convert.training_job(job))

    async def ListTrainingJobs(
        self, request: diffusion_pb2.ListTrainingJobsRequest, context: Context
    ) -> diffusion_pb2.ListTrainingJobsResponse:
        with self._counted("ListTrainingJobs"):
            jobs, token = self._training.list_jobs(
                self._tenant(context), request.page_size, request.page_token
            )
            return convert.list_training_jobs_response(jobs, token)

    async def WatchTrainingJob(
        self, request: diffusion_pb2.WatchTrainingJobRequest, context: Context
    ) -> AsyncIterator[diffusion_pb2.WatchTrainingJobResponse]:
        with self._counted("WatchTrainingJob"):
            tenant = self._tenant(context)
            events = self._training.watch_job(request.job_id, tenant)
            async with contextlib.aclosing(events):
                async for event in events:
                    yield convert.watch_response(event)

    async def CancelTrainingJob(
        self, request: diffusion_pb2.CancelTrainingJobRequest, context: Context
    ) -> diffusion_pb2.CancelTrainingJobResponse:
        with self._counted("CancelTrainingJob"):
            job = await self._training.cancel_job(request.job_id, self._tenant(context))
            return diffusion_pb2.CancelTrainingJobResponse(job=convert.training_job(job))


def _max_training_jobs(context: Context) -> int | None:
    """The tier's limit on the tenant's training jobs at once, if the gateway sent one."""
    for key, value in context.invocation_metadata() or ():
        if key == MAX_TRAINING_JOBS_HEADER and isinstance(value, str):
            try:
                limit = int(value)
            except ValueError:
                limit = -1
            if limit < 0:
                raise InvalidArgument(MAX_TRAINING_JOBS_HEADER, "must be an integer >= 0")
            return limit
    return None
