"""What the Ollama and OpenAI adapters share: upstream calls through the core,
errors as HTTP statuses, and typed reads of JSON request bodies.

Every upstream call is admitted by :class:`~gateway.core.GatewayCore` (key,
budgets, a concurrency slot for metered calls) and finished on every ending,
exactly as the gRPC proxy does, metered calls through the one lifecycle of
:mod:`gateway.calls`; only the transport differs. Calls go over the
gateway's backend channels as typed gRPC, with the vouched tenant metadata
and the caller's deadline (``X-Request-Timeout``, in seconds) when it sent
one. A caller who disconnects cancels the handler (aiohttp's handler
cancellation), which stops the upstream call; the call is billed what the
backend spent until it stopped, and the slot comes back then.

Errors keep one table: domain errors map to a gRPC code through the core's
:class:`~dreamsight_server.errors.ErrorTable`, upstream calls bring their
code, and the code maps to an HTTP status here (the grpc-gateway mapping).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc
from google.rpc import error_details_pb2, status_pb2

from dreamsight_server.errors import (
    DeadlineExceeded,
    DreamsightError,
    ErrorTable,
    InvalidArgument,
    ResourceExhausted,
)
from dreamsight_server.metadata import REQUEST_ID_HEADER
from gateway.calls import MeteredCall
from gateway.core import Admission, GatewayCore

log = logging.getLogger(__name__)

M = TypeVar("M")
R = TypeVar("R")
T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
TIMEOUT_HEADER = "X-Request-Timeout"
"""Seconds the caller will wait; it becomes the upstream gRPC deadline."""

# The grpc-gateway mapping of status codes to HTTP statuses.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


@dataclass
class HttpError:
    """An error as an HTTP front end tells it: status, safe message, the field."""

    code: grpc.StatusCode
    message: str
    param: str | None = None
    retry_after_s: float | None = None
    http_status: int | None = None
    """Set for aiohttp's own errors (404, 405, 413); otherwise the code decides."""

    @property
    def status(self) -> int:
        """The HTTP status."""
        return self.http_status or HTTP_STATUS.get(self.code, 500)

    def headers(self) -> dict[str, str]:
        """Retry-After (whole seconds, at least 1) when the caller should come back."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def http_error(error: BaseException, table: ErrorTable, request: web.Request) -> HttpError:
    """The HTTP form of any error; unexpected ones are logged, never shown."""
    if isinstance(error, grpc.aio.AioRpcError):
        return _from_status(error)
    if isinstance(error, web.HTTPRequestEntityTooLarge):  # says the limit and the size
        message = f"the request body is too large: {error.text}"
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        return HttpError(invalid, message, "body", http_status=error.status)
    if isinstance(error, web.HTTPException):  # aiohttp's own: unknown path, wrong method
        code = next((c for c, s in HTTP_STATUS.items() if s == error.status), None)
        return HttpError(code or grpc.StatusCode.UNKNOWN, error.reason, http_status=error.status)
    code = table.code_for(error)
    if isinstance(error, DreamsightError) and code is not grpc.StatusCode.INTERNAL:
        return HttpError(
            code,
            error.message,
            error.field if isinstance(error, InvalidArgument) else None,
            error.retry_after_s if isinstance(error, ResourceExhausted) else None,
        )
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    log.error(
        "internal error in %s %s (request id %s)",
        request.method,
        request.path,
        request_id,
        exc_info=error,
    )
    return HttpError(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")


def _from_status(error: grpc.aio.AioRpcError) -> HttpError:
    """An upstream status, with the field (BadRequest) and delay (RetryInfo) it carried."""
    result = HttpError(error.code(), error.details() or error.code().name.lower())
    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            bad, retry = error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
            if detail.Unpack(bad) and bad.field_violations:
                result.param = bad.field_violations[0].field
            elif detail.Unpack(retry):
                result.retry_after_s = retry.retry_delay.ToTimedelta().total_seconds()
    return result


def error_middleware(
    render: Callable[[HttpError], web.StreamResponse], table: ErrorTable
) -> Middleware:
    """Middleware that answers any error in one API's own error shape."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as error:
            return render(http_error(error, table, request))

    return middleware


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
    ) -> None:
        self.core = core
        self.body_limits = body_limits
        self._vision_channel = vision
        self._diffusion_channel = diffusion
        self._vision = vision_pb2_grpc.VisionServiceStub(vision)
        self._diffusion = diffusion_pb2_grpc.DiffusionServiceStub(diffusion)

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
        call: MeteredCall[Any] = MeteredCall(
            self.core,
            admission,
            channel,
            message,
            _remaining(expires),
            expires_at=expires,
            serializer=type(message).SerializeToString,
            deserializer=response_type.FromString,
        )
        try:
            await call.start()
            yield call
        finally:
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

    async def vision_models(
        self, request: web.Request, protocol: str
    ) -> list[vision_pb2.VisionModel]:
        """VisionService.ListModels."""
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
        """DiffusionService.ListModels: base models and the caller's own."""
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


MAX_JSON_DEPTH = 32
"""Deepest nesting a request body may have (a chat request needs 5)."""
_OFF_LOOP_BYTES = 64 * 1024
"""Bodies larger than this are decoded in a worker thread, off the event loop."""


async def read_json(request: web.Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object; any malformed body is InvalidArgument.

    A body over limit bytes is HTTP 413, refused from its Content-Length before
    a byte is read, or as soon as a chunked body passes it; large bodies are
    decoded off the event loop, so one tenant's body does not hold every other
    tenant's calls."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = bytearray()
    async for piece in request.content.iter_chunked(_OFF_LOOP_BYTES):
        raw += piece
        if len(raw) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
    charset = request.charset or "utf-8"
    if len(raw) > _OFF_LOOP_BYTES:
        return await asyncio.to_thread(decode_json, raw, charset)
    return decode_json(raw, charset)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_json(raw: bytes | bytearray, charset: str = "utf-8") -> dict[str, Any]:
    """Bytes as a JSON object of bounded depth, with finite numbers only."""
    try:
        text = raw.decode(charset)
    except LookupError:
        raise InvalidArgument("body", f"unsupported charset {charset[:40]!r}") from None
    except UnicodeDecodeError as error:
        raise InvalidArgument("body", f"not valid {charset[:40]}: {error.reason}") from None
    try:
        body = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidArgument("body", f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:  # JSONDecodeError, huge integers, non-finite numbers
        raise InvalidArgument("body", f"not valid JSON: {str(error)[:200]}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    _check_structure(body)
    return body


def _check_structure(body: Any) -> None:
    """Bounded depth, and no lone surrogates (``"\\ud800"`` is valid JSON but no
    string protobuf or a model can take)."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidArgument("body", f"nested deeper than {MAX_JSON_DEPTH} levels")
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        for item in items:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidArgument("body", "a string holds invalid unicode") from None
            elif isinstance(item, dict | list):
                stack.append((item, depth + 1))


_KINDS = {str: "a string", bool: "a boolean", float: "a number", int: "an integer"}


def get(body: Mapping[str, Any], key: str, kind: type[T], param: str) -> T | None:
    """body[key] checked to be of kind (ints count as floats); None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if kind is float and type(value) is int:
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidArgument(param, f"must be {_KINDS.get(kind, kind.__name__)}")
    return value


def get_int(body: Mapping[str, Any], key: str, param: str, low: int, high: int) -> int | None:
    """An integer within [low, high], or None when absent."""
    value = get(body, key, int, param)
    if value is not None and not low <= value <= high:
        raise InvalidArgument(param, f"{value} is outside {low} to {high}")
    return value


def stop_strings(value: Any, param: str) -> list[str]:
    """A stop string or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidArgument(param, "must be a string or a list of strings")


def decode_base64(text: Any, param: str) -> bytes:
    """Bytes from base64 text (standard alphabet, padding optional)."""
    if not isinstance(text, str):
        raise InvalidArgument(param, "must be a base64 string")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(param, "is not valid base64") from None


def json_schema_format(schema: Any, param: str) -> vision_pb2.ResponseFormat:
    """A JSON-schema response format from a schema object."""
    if not isinstance(schema, dict):
        raise InvalidArgument(param, "must be a JSON schema object")
    return vision_pb2.ResponseFormat(
        type=vision_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=json.dumps(schema)
    )


def refuse(body: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    """InvalidArgument for the first of keys given a non-empty value (unsupported here)."""
    for key in keys:
        if body.get(key):
            raise InvalidArgument(key, "is not supported by dreamsight")


MAX_SEED = 2**63 - 1
MAX_UINT32 = 2**32 - 1
MAX_INT32 = 2**31 - 1
