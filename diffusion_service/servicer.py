"""DiffusionService over gRPC: validate -> convert -> engine -> convert.

Only the generation half is served here. The training RPCs are not
overridden: the generated base class raises NotImplementedError, which the
error table maps to UNIMPLEMENTED, until the DreamBooth issue lands.
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
from diffusion_service.metrics import DiffusionMetrics
from dreamsight_server.errors import ErrorTable
from dreamsight_server.metadata import gpu_seconds_trailer
from dreamsight_server.tenancy import tenant_from_metadata

Context = grpc.aio.ServicerContext[Any, Any]


class DiffusionServicer(diffusion_pb2_grpc.DiffusionServiceServicer):
    """Thin transport over an :class:`ImageEngine`."""

    def __init__(
        self,
        engine: ImageEngine,
        settings: DiffusionSettings,
        metrics: DiffusionMetrics,
        errors: ErrorTable,
    ) -> None:
        self._engine = engine
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
            self._engine.delete_model(request.name, self._tenant(context))
            return diffusion_pb2.DeleteModelResponse()
