"""Server interceptors shared by the three services.

:class:`ErrorMappingInterceptor` is where a process's error table is applied:
every unary and server-streaming handler is wrapped once, so servicers just
raise domain errors. It also gives each call a request id (from the
``x-request-id`` metadata or a fresh one) in a context variable, for logs.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from dreamsight_server.errors import DreamsightError, ErrorTable
from dreamsight_server.metadata import REQUEST_ID_HEADER
from dreamsight_server.rich_status import to_status

log = logging.getLogger(__name__)

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def current_request_id() -> str:
    """The id of the call being served (empty outside a call)."""
    return request_id_var.get()


MAPS_OWN_ERRORS = "__dreamsight_maps_own_errors__"


def maps_own_errors(behavior: Any) -> Any:
    """Mark a handler that maps its errors itself (with :func:`abort_with`), so
    the interceptor leaves it unwrapped: a proxy's streaming hot path then
    pays for no extra generator layer per message."""
    setattr(behavior, MAPS_OWN_ERRORS, True)
    return behavior


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


def error_status(
    error: Exception, method: str, table: ErrorTable, request_id: str | None = None
) -> grpc.Status:
    """The status (code, details, trailing metadata) the error table gives for
    error; anything unmapped is logged and becomes a generic INTERNAL."""
    code = table.code_for(error)
    request_id = request_id or request_id_var.get()
    if isinstance(error, DreamsightError) and code is not grpc.StatusCode.INTERNAL:
        return to_status(code, error.message, error)
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return to_status(code, f"{method} is not implemented", None)
    log.exception("internal error in %s (request id %s)", method, request_id, exc_info=error)
    return to_status(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})", None)


async def abort_with(
    context: grpc.aio.ServicerContext[Any, Any],
    error: Exception,
    method: str,
    table: ErrorTable,
    request_id: str | None = None,
    extra_trailers: tuple[tuple[str, str], ...] = (),
) -> None:
    """End a call with the status the error table gives for error (and extra trailers)."""
    if context.cancelled() or context.done():
        return  # the caller is gone; there is nobody to tell
    status = error_status(error, method, table, request_id)
    trailers = (*status.trailing_metadata, *extra_trailers)
    await context.abort(status.code, status.details, trailers)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps domain errors to statuses; turns anything else into a generic INTERNAL."""

    def __init__(self, table: ErrorTable | None = None) -> None:
        self._table = table or ErrorTable()

    async def _abort(
        self, context: grpc.aio.ServicerContext[Any, Any], error: Exception, method: str
    ) -> None:
        await abort_with(context, error, method, self._table)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        behavior = handler.unary_unary or handler.unary_stream
        if getattr(behavior, MAPS_OWN_ERRORS, False):
            return handler
        method = handler_call_details.method
        # Unary handlers, and streaming ones written with context.write(): a coroutine.
        inner_unary = handler.unary_unary or (
            handler.unary_stream
            if handler.unary_stream is not None
            and not inspect.isasyncgenfunction(handler.unary_stream)
            else None
        )
        if inner_unary is not None:

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                request_id_var.set(_request_id(context))
                try:
                    return await inner_unary(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as error:  # mapped, never leaked
                    await self._abort(context, error, method)

            make = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary is not None
                else grpc.unary_stream_rpc_method_handler
            )
            return make(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                request_id_var.set(_request_id(context))
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as error:  # mapped, never leaked
                    await self._abort(context, error, method)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
