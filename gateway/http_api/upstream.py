"""Typed upstream calls for both HTTP APIs, each admitted and finished by the core.

Every upstream call is admitted by :class:`~gateway.core.GatewayCore` (key,
budgets, a concurrency slot for metered calls) and finished on every ending,
exactly as the gRPC proxy does, metered calls through the one lifecycle of
:mod:`gateway.calls`; only the transport differs. Calls go over the gateway's
backend channels as typed gRPC, with the vouched tenant metadata and the
caller's deadline (``X-Request-Timeout``, in seconds) when it sent one. A
caller who disconnects cancels the handler (aiohttp's handler cancellation),
which stops the upstream call; the call is billed what the backend spent
until it stopped, and the slot comes back then.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from aiohttp import web
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dreamsight_server.errors import (
    DeadlineExceeded,
    DreamsightError,
    InvalidArgument,
    NotFound,
)
from dreamsight_server.metadata import REQUEST_ID_HEADER
from gateway.calls import MeteredCall
from gateway.core import Admission, GatewayCore
from gateway.http_api.body import OFF_LOOP_BYTES

M = TypeVar("M")


R = TypeVar("R")


Metadata = tuple[tuple[str, str], ...]


PUBLIC_TENANT = "dreamsight-keyless-listing"
"""The tenant keyless listings ask as; only base models are kept from its answer."""
PUBLIC_LIST_TTL_S = 5.0
"""Seconds a keyless listing is kept (and the backends' timeout for it)."""


TIMEOUT_HEADER = "X-Request-Timeout"
"""Seconds the caller will wait; it becomes the upstream gRPC deadline."""


class ChatStream(web.StreamResponse):
    """A streamed chat reply whose headers go out with its first bytes (one write
    instead of two; the first message is already here when it starts)."""

    _send_headers_immediately = False  # aiohttp's own switch (web.Response sets it too)


async def relay_chat(
    call: MeteredCall[vision_pb2.ChatResponse],
    message: vision_pb2.ChatResponse | None,
    encode: Callable[[vision_pb2.ChatResponse], bytes],
    response: web.StreamResponse,
    *,
    start: bytes = b"",
    end: bytes = b"",
) -> None:
    """Write a chat stream from start and message on, those already waiting (a
    client that lags) in one write, then end the body: at the message carrying
    final the reply is whole, so it ends for the client at once, in the same
    write, and the call is marked complete (its bill follows the backend's own
    end, see MeteredCall.completed)."""
    data = start
    while message is not None:
        more = call.ready()
        data += encode(message) + b"".join(map(encode, more))
        if (more[-1] if more else message).HasField("final"):
            call.completed()
            await response.write_eof(data + end)
            return
        await response.write(data)
        data = b""
        message = await call.read()
    await response.write_eof(data + end)


def reply_text(messages: list[vision_pb2.ChatResponse]) -> str:
    """The reply as the stream delivered it: its deltas, joined."""
    return "".join(m.delta for m in messages if m.HasField("delta"))


@dataclass(frozen=True)
class BodyLimits:
    """Largest request bodies, in bytes (HTTP 413 beyond)."""

    chat: int
    """Chat endpoints, whose bodies carry base64 images."""
    other: int
    """Every other endpoint."""


class Upstream:
    """Typed calls to the backends, each admitted and finished by the core."""

    def __init__(
        self,
        core: GatewayCore,
        vision: grpc.aio.Channel,
        diffusion: grpc.aio.Channel,
        body_limits: BodyLimits,
        public_models: bool = True,
    ) -> None:
        self.core = core
        self.body_limits = body_limits
        self._public_models = public_models
        self._public: dict[str, tuple[float, list[Any]]] = {}
        self._vision_channel = vision
        self._diffusion_channel = diffusion
        self._vision = vision_pb2_grpc.VisionServiceStub(vision)
        self._diffusion = diffusion_pb2_grpc.DiffusionServiceStub(diffusion)

    async def health(self, timeout_s: float = 2.0) -> dict[str, bool]:
        """Whether each backend's grpc.health.v1 check says SERVING."""

        async def serving(channel: grpc.aio.Channel) -> bool:
            check = health_pb2_grpc.HealthStub(channel).Check
            try:
                reply = await check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        vision, diffusion = await asyncio.gather(
            serving(self._vision_channel), serving(self._diffusion_channel)
        )
        return {"vision": vision, "diffusion": diffusion}

    async def authenticate(self, request: web.Request) -> None:
        """Unauthenticated unless the key is good: checked before a body is read."""
        await self.core.authenticate(request.headers.get("Authorization"))

    async def _admit(
        self,
        request: web.Request,
        protocol: str,
        service: str,
        method: str,
        metered: bool,
        expires: float | None,
    ) -> Admission:
        admit = self.core.admit(
            request.headers.get("Authorization"),
            service,
            method,
            request.headers.get(REQUEST_ID_HEADER),
            metered=metered,
            protocol=protocol,
        )
        try:
            return await asyncio.wait_for(admit, _remaining(expires))
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed while waiting for a slot") from None

    @contextlib.asynccontextmanager
    async def _stream(
        self,
        request: web.Request,
        protocol: str,
        service: str,
        method: str,
        channel: grpc.aio.Channel,
        message: Any,
        response_type: Any,
    ) -> AsyncIterator[MeteredCall[Any]]:
        """A metered call in the one lifecycle (gateway.calls), settled on every
        ending: done, failed, the caller gone (aiohttp cancels the handler) or its
        X-Request-Timeout passed."""
        expires = deadline(request)
        admission = await self._admit(request, protocol, service, method, True, expires)
        payload: Any = message
        serializer: Callable[[Any], bytes] | None = type(message).SerializeToString
        if message.ByteSize() > OFF_LOOP_BYTES:  # images: serialize in a worker thread
            payload, serializer = await asyncio.to_thread(message.SerializeToString), None
        call: MeteredCall[Any] = MeteredCall(
            self.core,
            admission,
            channel,
            payload,
            _remaining(expires),
            expires_at=expires,
            serializer=serializer,
            deserializer=response_type.FromString,
        )
        try:
            await call.start()
            yield call
        finally:
            if call.reply_complete:  # the caller has it all: bill without holding it
                self.core.settle_later(call.settle())
            else:
                await self.core.settle(call.settle())

    def chat(
        self, request: web.Request, protocol: str, chat: vision_pb2.ChatRequest
    ) -> contextlib.AbstractAsyncContextManager[MeteredCall[vision_pb2.ChatResponse]]:
        """A metered VisionService.Chat stream."""
        return self._stream(
            request,
            protocol,
            "VisionService",
            "Chat",
            self._vision_channel,
            chat,
            vision_pb2.ChatResponse,
        )

    async def first_reply(
        self,
        request: web.Request,
        protocol: str,
        call: MeteredCall[vision_pb2.ChatResponse],
        model: str,
    ) -> vision_pb2.ChatResponse | None:
        """A chat's first message; a model that cannot chat is NotFound saying which can."""
        try:
            return await call.read()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            explained = await self._which_models_chat(request, protocol, model)
            if explained is None:
                raise
            raise explained from error

    async def _which_models_chat(
        self, request: web.Request, protocol: str, name: str
    ) -> NotFound | None:
        try:
            chat, image = await asyncio.gather(
                self.vision_models(request, protocol), self.diffusion_models(request, protocol)
            )
        except (grpc.aio.AioRpcError, DreamsightError):
            return None  # the upstream's own NOT_FOUND still says what is wrong
        can_chat = ", ".join(repr(m.name) for m in chat) or "none right now"
        if any(m.name == name for m in image):
            return NotFound(
                f"{name!r} draws images and cannot chat (use it for image generation); "
                f"models that can chat: {can_chat}"
            )
        return NotFound(f"no chat model is called {name!r}; models that can chat: {can_chat}")

    def generate(
        self, request: web.Request, protocol: str, generate: diffusion_pb2.GenerateRequest
    ) -> contextlib.AbstractAsyncContextManager[MeteredCall[diffusion_pb2.GenerateResponse]]:
        """A metered DiffusionService.Generate stream."""
        return self._stream(
            request,
            protocol,
            "DiffusionService",
            "Generate",
            self._diffusion_channel,
            generate,
            diffusion_pb2.GenerateResponse,
        )

    async def _unary(
        self,
        request: web.Request,
        protocol: str,
        service: str,
        method: str,
        call: Callable[[Metadata, float | None], Awaitable[R]],
    ) -> R:
        expires = deadline(request)
        admission = await self._admit(request, protocol, service, method, False, expires)
        code = grpc.StatusCode.CANCELLED
        try:
            result = await call(self.core.backend_metadata(admission), _remaining(expires))
            code = grpc.StatusCode.OK
            return result
        except grpc.aio.AioRpcError as error:
            code = error.code()
            raise
        finally:
            await asyncio.shield(self.core.finish(admission, code, None))

    def _keyless(self, request: web.Request) -> bool:
        return self._public_models and "Authorization" not in request.headers

    async def _public_list(
        self, service: str, call: Callable[[Metadata], Awaitable[list[Any]]]
    ) -> list[Any]:
        """A keyless caller's listing: the backends' answer to no tenant, kept a few
        seconds, so keyless callers cost the backends one call per interval at most."""
        now = asyncio.get_running_loop().time()
        kept = self._public.get(service)
        if kept is not None and kept[0] > now:
            return kept[1]
        metadata = self.core.tenant_metadata(PUBLIC_TENANT, uuid.uuid4().hex)
        models = await call(metadata)
        self._public[service] = (now + PUBLIC_LIST_TTL_S, models)
        return models

    async def vision_models(
        self, request: web.Request, protocol: str
    ) -> list[vision_pb2.VisionModel]:
        """VisionService.ListModels (every chat model is a base model)."""
        if self._keyless(request):

            async def listed(metadata: Metadata) -> list[Any]:
                reply = await self._vision.ListModels(
                    vision_pb2.ListModelsRequest(), metadata=metadata, timeout=PUBLIC_LIST_TTL_S
                )
                return list(reply.models)

            return await self._public_list("vision", listed)
        response = await self._unary(
            request,
            protocol,
            "VisionService",
            "ListModels",
            lambda metadata, timeout: self._vision.ListModels(
                vision_pb2.ListModelsRequest(), metadata=metadata, timeout=timeout
            ),
        )
        return list(response.models)

    async def vision_model(
        self, request: web.Request, protocol: str, name: str
    ) -> vision_pb2.VisionModel:
        """VisionService.GetModel."""
        response = await self._unary(
            request,
            protocol,
            "VisionService",
            "GetModel",
            lambda metadata, timeout: self._vision.GetModel(
                vision_pb2.GetModelRequest(name=name), metadata=metadata, timeout=timeout
            ),
        )
        return response.model

    async def diffusion_models(
        self, request: web.Request, protocol: str
    ) -> list[diffusion_pb2.DiffusionModel]:
        """DiffusionService.ListModels: base models and the caller's own (base models
        only to a caller without a key)."""
        if self._keyless(request):

            async def listed(metadata: Metadata) -> list[Any]:
                reply = await self._diffusion.ListModels(
                    diffusion_pb2.ListModelsRequest(), metadata=metadata, timeout=PUBLIC_LIST_TTL_S
                )
                return [m for m in reply.models if not m.base_model and not m.job_id]

            return await self._public_list("diffusion", listed)
        response = await self._unary(
            request,
            protocol,
            "DiffusionService",
            "ListModels",
            lambda metadata, timeout: self._diffusion.ListModels(
                diffusion_pb2.ListModelsRequest(), metadata=metadata, timeout=timeout
            ),
        )
        return list(response.models)


def deadline(request: web.Request) -> float | None:
    """When the caller stops waiting (event-loop time), from X-Request-Timeout seconds."""
    text = request.headers.get(TIMEOUT_HEADER)
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgument(TIMEOUT_HEADER, "must be a positive number of seconds")
    return asyncio.get_running_loop().time() + seconds


def _remaining(expires: float | None) -> float | None:
    if expires is None:
        return None
    return max(0.0, expires - asyncio.get_running_loop().time())
