"""Errors as the HTTP front ends tell them: one mapping, for both APIs.

Domain errors map to a gRPC code through the core's
:class:`~dreamsight_server.errors.ErrorTable`, upstream calls bring their
code (with the field and retry delay their google.rpc details carry), and the
code maps to an HTTP status here (the grpc-gateway mapping). Each API renders
an :class:`HttpError` in its own shape.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from google.rpc import error_details_pb2, status_pb2

from dreamsight_server.errors import (
    DreamsightError,
    ErrorTable,
    InvalidArgument,
    ResourceExhausted,
)
from dreamsight_server.metadata import REQUEST_ID_HEADER

log = logging.getLogger(__name__)


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
