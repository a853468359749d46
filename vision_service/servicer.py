"""VisionService over gRPC: validate -> convert -> engine -> convert."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc

from dreamsight_server.errors import ErrorTable, NotFound, Unavailable
from dreamsight_server.metadata import gpu_seconds_trailer
from dreamsight_server.tenancy import tenant_from_metadata
from vision_service import convert
from vision_service.config import VisionSettings
from vision_service.domain import ChatDone
from vision_service.engine import ChatEngine
from vision_service.metrics import VisionMetrics

Context = grpc.aio.ServicerContext[Any, Any]
_OFF_LOOP_BYTES = 64 * 1024


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    """Thin transport over a :class:`ChatEngine`."""

    def __init__(
        self,
        engine: ChatEngine,
        settings: VisionSettings,
        metrics: VisionMetrics,
        errors: ErrorTable,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._metrics = metrics
        self._errors = errors

    async def Chat(
        self, request: vision_pb2.ChatRequest, context: Context
    ) -> AsyncIterator[vision_pb2.ChatResponse]:
        outcome = "ok"
        self._metrics.in_flight.inc()
        try:
            self._check_caller(context)
            if not self._engine.ready:
                raise Unavailable("the vision model is loading; retry shortly")
            args = (request, self._engine.info, self._settings.images)
            if any(m.images for m in request.messages) or request.ByteSize() > _OFF_LOOP_BYTES:
                # Decoding images (or converting a large request) takes a while: off the loop.
                chat = await asyncio.to_thread(
                    convert.chat_input, *args, self._settings.max_stop_strings
                )
            else:  # a short text chat converts in microseconds: a thread hop would cost more
                chat = convert.chat_input(*args, self._settings.max_stop_strings)
            async with contextlib.aclosing(self._engine.chat(chat)) as events:
                async for event in events:
                    if isinstance(event, ChatDone):
                        context.set_trailing_metadata(gpu_seconds_trailer(event.gpu_seconds))
                    yield convert.chat_response(event)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as error:
            outcome = self._errors.code_for(error).name.lower()
            raise
        finally:
            self._metrics.in_flight.dec()
            self._metrics.requests.labels("Chat", outcome).inc()

    def _check_caller(self, context: Context) -> None:
        """With a gateway secret configured, only the gateway may call."""
        if self._settings.gateway_secret:
            tenant_from_metadata(context.invocation_metadata(), self._settings.gateway_secret)

    async def ListModels(
        self, request: vision_pb2.ListModelsRequest, context: Context
    ) -> vision_pb2.ListModelsResponse:
        self._check_caller(context)
        self._metrics.requests.labels("ListModels", "ok").inc()
        return vision_pb2.ListModelsResponse(models=[convert.vision_model(self._engine.info)])

    async def GetModel(
        self, request: vision_pb2.GetModelRequest, context: Context
    ) -> vision_pb2.GetModelResponse:
        self._check_caller(context)
        if request.name != self._engine.info.name:
            self._metrics.requests.labels("GetModel", "not_found").inc()
            raise NotFound(f"model {request.name!r} is not served here")
        self._metrics.requests.labels("GetModel", "ok").inc()
        return vision_pb2.GetModelResponse(model=convert.vision_model(self._engine.info))
