"""Lanes: many settled calls from the gateway on one stream (the backend's side).

A settled call (:mod:`dreamsight_server.metering`) costs two gRPC messages per
streamed message across the gateway-to-backend hop, one written here and one
read at the gateway, each a trip through gRPC's core. A lane carries many
calls on one bidirectional stream, ``/dreamsight.internal.v1.Lanes/Carry``
(messages in ``dreamsight/internal/v1/lanes.proto``): the gateway opens and
stops calls with ``LaneRequest`` messages, and one writer per lane sends
everything its calls produced since its last write as one ``LaneReply``, so
the deltas of all the requests of one engine step cross the hop as one
message. The other way, a ``LaneRequest`` carries in its ``batch`` the
requests the gateway queued while its last one was being written (lanes
version 2, announced in the ``x-dreamsight-lanes`` header), so calls opened
together (a burst of clients) arrive in one message, each a gRPC write and
read fewer on both sides.

Each call keeps the settled contract whole: its behaviour runs as the settled
twin's does (:func:`~dreamsight_server.metering.run_settled`: allowance,
usage, the "settled ..." log line), a stop waits until the work has really
stopped, and every ending carries what the call spent. A caller's call
metadata (tenant, request id, allowance, gateway token) travels in its
``LaneOpen`` and is what the behaviour sees as invocation metadata, so a
servicer's own checks apply to each call as they would to a gRPC call. If the
lane itself ends (the gateway gone), every call on it is stopped.

A lane is taken only from a caller with the gateway's token (the lane's own
metadata; each call's metadata is then checked by the servicer as usual),
and a call whose own code fails before it could end is still ended, with
INTERNAL, so that no gateway call waits for an end that never comes.

On shutdown, :meth:`LaneServer.retire` tells each lane's gateway to open no
more calls on it; the calls on it finish within the server's grace period.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from dreamsight.internal.v1 import lanes_pb2

from dreamsight_server.errors import (
    ErrorTable,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
)
from dreamsight_server.interceptors import abort_with, error_status
from dreamsight_server.metadata import LANES_HEADER, LANES_VERSION
from dreamsight_server.metering import Behavior, run_settled
from dreamsight_server.tenancy import check_gateway_token

LANES_SERVICE = "dreamsight.internal.v1.Lanes"
"""The internal service of lanes (a generic handler, as the settled twins are)."""
LANE_METHOD = "Carry"
LANE_PATH = f"/{LANES_SERVICE}/{LANE_METHOD}"

log = logging.getLogger(__name__)

_ENDED = object()
"""A call's task result once its LaneEnd is queued."""
REPLY_BYTES = 1024 * 1024
"""A LaneReply carries messages up to about this many bytes (at least one
message), well under any gRPC receive limit a gateway sets."""


class LaneCallContext:
    """What a servicer behaviour sees of its call on a lane: the parts of
    ``grpc.aio.ServicerContext`` a unary-stream servicer method uses."""

    def __init__(self, metadata: Sequence[tuple[str, str]], deadline: float | None) -> None:
        self._metadata = tuple(metadata)
        self._deadline = deadline
        self._trailers: tuple[tuple[str, Any], ...] = ()
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The call's metadata, from its LaneOpen."""
        return self._metadata

    def time_remaining(self) -> float | None:
        """Seconds left before the call's deadline, or None without one."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        """Trailers for the call's end (the GPU-seconds trailer is set by the lane)."""
        self._trailers = tuple(metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        """The status the call ends with, when it ends by itself."""
        self._code = code

    def set_details(self, details: str) -> None:
        """The status message the call ends with."""
        self._details = details

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        """End the call now with a status, as ServicerContext.abort does."""
        self._code, self._details = code, details
        self._trailers = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def cancelled(self) -> bool:
        """Whether the caller went away (a stopped call ends through the lane)."""
        return False

    def done(self) -> bool:
        """Whether the call has ended (the behaviour runs only while it has not)."""
        return False

    def peer(self) -> str:
        """The caller: always the gateway, on a lane."""
        return "lane"


def _end(
    code: grpc.StatusCode, details: str, trailers: Sequence[tuple[str, Any]], gpu_seconds: float
) -> lanes_pb2.LaneEnd:
    return lanes_pb2.LaneEnd(
        code=code.value[0],
        details=details,
        trailers=[
            lanes_pb2.LaneTrailer(
                key=key, value=value if isinstance(value, bytes) else value.encode()
            )
            for key, value in trailers
        ],
        gpu_seconds=gpu_seconds,
    )


class _Lane:
    """One lane: its calls, and the writer that batches what they produce."""

    def __init__(self, server: LaneServer, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._server = server
        self._context = context
        self._calls: dict[int, tuple[asyncio.Task[Any], asyncio.Future[None]]] = {}
        self._windows: dict[int, _Window] = {}
        self._items: list[lanes_pb2.LaneItem] = []
        self._bytes = 0
        self._retiring = server.retiring
        self._wake = asyncio.Event()
        self._closing = False
        if self._retiring:
            self._wake.set()

    def retire(self) -> None:
        """Tell the gateway to open no more calls here."""
        self._retiring = True
        self._wake.set()

    def _emit(self, item: lanes_pb2.LaneItem, size: int = 0) -> None:
        self._items.append(item)
        self._bytes += size
        self._wake.set()

    def _take(self) -> list[lanes_pb2.LaneItem]:
        """What the next LaneReply carries: everything pending, or as many as fit
        in REPLY_BYTES (the rest goes in the next)."""
        if self._bytes <= REPLY_BYTES:
            items, self._items, self._bytes = self._items, [], 0
            return items
        size = count = 0
        for item in self._items:
            count += 1
            size += len(item.message)
            if size >= REPLY_BYTES:
                break
        items, self._items = self._items[:count], self._items[count:]
        self._bytes -= size
        self._wake.set()  # the rest: next write
        return items

    async def _write_all(self) -> None:
        """The writer: whatever is pending, as one LaneReply per write."""
        told_retiring = False
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            items = self._take()
            retiring = self._retiring and not told_retiring
            if items or retiring:
                told_retiring = told_retiring or retiring
                await self._context.write(lanes_pb2.LaneReply(items=items, retiring=retiring))
            if self._closing and not self._items:
                return

    async def run(self) -> None:
        """Serve the lane until the gateway closes it and its calls have ended."""
        writer = asyncio.ensure_future(self._write_all())
        reader = asyncio.ensure_future(self._read_all())
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if writer.done():  # the gateway went away: nobody reads the rest
                reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            # Stop whatever still runs (the gateway closed the lane, or is gone).
            for _, stop in self._calls.values():
                if not stop.done():
                    stop.set_result(None)
            calls = [task for task, _ in self._calls.values()]
            if calls:
                await asyncio.wait(calls)
            self._closing = True
            self._wake.set()
            if not writer.done():
                await writer
        finally:
            writer.cancel()
            for task, _ in self._calls.values():
                task.cancel()
            if writer.done() and not writer.cancelled():
                writer.exception()  # the gateway went away mid-write: nothing to tell

    async def _read_all(self) -> None:
        read = self._context.read
        while True:
            request = await read()
            if request is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            self._act(request)
            for queued in request.batch:  # queued behind it (their own batches: none)
                self._act(queued)

    def _act(self, request: lanes_pb2.LaneRequest) -> None:
        """Open, stop or widen the window of one call."""
        which = request.WhichOneof("action")
        if which == "open":
            self._open(request.call, request.open)
        elif which == "stop":
            entry = self._calls.get(request.call)
            if entry is not None and not entry[1].done():
                entry[1].set_result(None)
        elif which == "consumed_bytes":
            window = self._windows.get(request.call)
            if window is not None:
                window.consumed(request.consumed_bytes)

    def _open(self, number: int, open_: lanes_pb2.LaneOpen) -> None:
        if number in self._calls:
            return  # a gateway never reuses a number while its call runs; ignore a repeat
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[None] = loop.create_future()
        task = loop.create_task(self._serve(number, open_, stop))
        self._calls[number] = (task, stop)
        if open_.window_bytes:
            self._windows[number] = _Window(open_.window_bytes)
        task.add_done_callback(lambda done: self._forget(number, done))

    def _forget(self, number: int, task: asyncio.Task[Any]) -> None:
        self._calls.pop(number, None)
        self._windows.pop(number, None)
        if task.cancelled() or task.exception() is None:
            return
        # The call failed before it could send its end (a bug): end it here, or
        # the gateway's call would wait for an end that never comes.
        failure = task.exception()
        error = failure if isinstance(failure, Exception) else RuntimeError(repr(failure))
        log.error("lane call %d failed without its end", number)
        status = error_status(error, LANE_PATH, self._server.table)  # logged there
        self._emit(lanes_pb2.LaneItem(call=number, end=_end(status.code, status.details, (), 0.0)))

    async def _serve(
        self, number: int, open_: lanes_pb2.LaneOpen, stop: asyncio.Future[None]
    ) -> Any:
        server = self._server
        metadata = [(header.key, header.value) for header in open_.metadata]
        timeout = open_.timeout_seconds if open_.HasField("timeout_seconds") else None
        name = open_.method.replace(".", "/", 1)
        method = server.methods.get(open_.method)
        try:
            if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
                # A NaN would sit in the event loop's timer heap and hold every later timer back.
                raise InvalidArgument("timeout_seconds", "must be a finite number, at least 0")
            if self._retiring:
                raise Unavailable("the service is shutting down; retry")
            if method is None:
                raise InvalidArgument("method", f"{open_.method!r} is not carried on lanes")
            behavior, request_type, response_type = method
            try:
                request = request_type.FromString(open_.request)
            except Exception:  # a DecodeError: the gateway sent what this method cannot read
                raise InvalidArgument("request", f"not a {request_type.__name__}") from None
        except Exception as error:
            status = error_status(error, name, server.table)
            self._emit(
                lanes_pb2.LaneItem(
                    call=number,
                    end=_end(status.code, status.details, status.trailing_metadata, 0.0),
                )
            )
            return _ENDED
        deadline = None if timeout is None else time.monotonic() + timeout
        context = LaneCallContext(metadata, deadline)
        self._emit(lanes_pb2.LaneItem(call=number, device_share=server.device_share()))
        serialize = response_type.SerializeToString
        emit = self._emit
        window = self._windows.get(number)

        async def write(message: Any) -> None:
            data = serialize(message)
            emit(lanes_pb2.LaneItem(call=number, message=data), len(data))
            if window is not None:
                await window.sent(len(data))

        timer = None
        timed_out = False
        if timeout is not None:

            def expire() -> None:
                nonlocal timed_out
                if not stop.done():
                    timed_out = True
                    stop.set_result(None)

            timer = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            untyped: Any = context  # the parts of a ServicerContext behaviours use
            settled = await run_settled(behavior, request, untyped, write, stop, name)
        finally:
            if timer is not None:
                timer.cancel()
        spent = settled.usage.gpu_seconds
        failure = settled.error
        if isinstance(failure, grpc.aio.AbortError) and context._code is not None:
            end = _end(context._code, context._details, context._trailers, spent)
        elif isinstance(failure, Exception):
            status = error_status(failure, name, server.table)
            end = _end(status.code, status.details, status.trailing_metadata, spent)
        elif settled.stopped and timed_out:
            end = _end(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", (), spent)
        elif settled.stopped:
            end = _end(grpc.StatusCode.CANCELLED, "stopped by the gateway", (), spent)
        else:
            code = context._code or grpc.StatusCode.OK
            end = _end(code, context._details, (), spent)
        emit(lanes_pb2.LaneItem(call=number, end=end))
        return _ENDED


class _Window:
    """A call's flow control: bytes sent that its caller has not taken yet."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._outstanding = 0
        self._room: asyncio.Future[None] | None = None

    async def sent(self, size: int) -> None:
        """Count a message sent; wait while the caller is a window behind."""
        self._outstanding += size
        while self._outstanding >= self._limit:
            self._room = asyncio.get_running_loop().create_future()
            try:
                await self._room
            finally:
                self._room = None

    def consumed(self, size: int) -> None:
        """The caller took size bytes."""
        self._outstanding = max(0, self._outstanding - size)
        room = self._room
        if room is not None and not room.done() and self._outstanding < self._limit:
            room.set_result(None)


class LaneServer:
    """A backend's lanes for its metered methods, as one generic handler."""

    def __init__(
        self,
        service: str,
        methods: dict[str, tuple[Behavior, Any, Any]],
        table: ErrorTable,
        device_share: Callable[[], float],
        gateway_secret: str | None = None,
    ) -> None:
        """``gateway_secret``: a lane is taken only from a caller with the
        gateway's token (as every call a backend serves), before any of its
        calls is read; each call's own metadata is then checked as usual."""
        self.methods = {f"{service}.{name}": method for name, method in methods.items()}
        self.table = table
        self.device_share = device_share
        self.gateway_secret = gateway_secret
        self.retiring = False
        self._lanes: set[_Lane] = set()

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The generic handler to add to the backend's server."""

        async def carry(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            try:
                check_gateway_token(context.invocation_metadata(), self.gateway_secret)
            except Unauthenticated as refused:
                await abort_with(context, refused, LANE_PATH, self.table)
                return
            await context.send_initial_metadata(((LANES_HEADER, str(LANES_VERSION)),))
            lane = _Lane(self, context)
            self._lanes.add(lane)
            try:
                await lane.run()
            finally:
                self._lanes.discard(lane)

        method = grpc.stream_stream_rpc_method_handler(
            carry,
            request_deserializer=lanes_pb2.LaneRequest.FromString,
            response_serializer=lanes_pb2.LaneReply.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(LANES_SERVICE, {LANE_METHOD: method})

    def retire(self) -> None:
        """Shutting down: every lane's gateway opens no more calls on it."""
        self.retiring = True
        for lane in self._lanes:
            lane.retire()
