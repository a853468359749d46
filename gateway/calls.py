"""One lifecycle for every metered call the gateway forwards (Chat, Generate),
whichever front end admitted it: the gRPC pass-through and both HTTP APIs.

admit (in the core) -> call the backend's settled twin (on a lane shared
with other calls where :mod:`gateway.lanes` carries the method) -> read
messages -> settle. Settling happens on every ending, exactly once: on a normal end or a
backend error the backend's trailer is already here; on a caller's cancel,
disconnect or deadline the gateway half-closes the stream ("stop now") and
waits for the backend to stop its work and report (see
:mod:`dreamsight_server.metering`). Then the core bills the GPU-seconds and
only then gives the tenant's slot back, so a tenant never has more work
running on the backends than its tier allows. A backend that dies mid-call
reports nothing: the call is billed an estimate (elapsed time x the device
share the backend announced), marked as one in the ledger.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

import grpc

from dreamsight_server.errors import DeadlineExceeded
from dreamsight_server.metadata import DEVICE_SHARE_HEADER, GPU_SECONDS_TRAILER
from dreamsight_server.metering import settled_path
from gateway.core import Admission, GatewayCore
from gateway.lanes import pool_for

M = TypeVar("M")
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


def _float(metadata: Any, key: str) -> float | None:
    for name, value in metadata or ():
        if name == key:
            with contextlib.suppress(ValueError, TypeError):
                number = float(value)
                if math.isfinite(number) and number >= 0:
                    return number
    return None


_MULTICALLABLES: weakref.WeakKeyDictionary[grpc.aio.Channel, dict[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)


def _settled(
    channel: grpc.aio.Channel,
    service: str,
    method: str,
    serializer: Callable[[Any], bytes] | None,
    deserializer: Callable[[bytes], Any] | None,
) -> Any:
    """The settled twin's multicallable on a channel, made (and its method
    registered with the channel, as generated stubs do) once."""
    calls = _MULTICALLABLES.setdefault(channel, {})
    key = (service, method, serializer, deserializer)
    multicallable = calls.get(key)
    if multicallable is None:
        path = settled_path(service, method)
        untyped: Any = channel  # grpc-stubs lack _registered_method
        multicallable = untyped.stream_stream(
            path, serializer, deserializer, _registered_method=True
        )
        calls[key] = multicallable
    return multicallable


_INBOX = 8
"""Messages read ahead of the caller, at most (gRPC flow control holds the rest)."""


class MeteredCall(Generic[M]):
    """One admitted metered call upstream, from its first message to its bill.

    One reader task per call reads the backend's messages into a short inbox
    that read() takes from: a caller's cancel or deadline only stops the
    caller's wait, never grpc's read (cancelling that would cancel the whole
    call and lose its trailer, hence its bill). A caller that lags finds the
    messages already there and takes them without waiting on the loop.
    """

    def __init__(
        self,
        core: GatewayCore,
        admission: Admission,
        channel: grpc.aio.Channel,
        request: Any,
        caller_timeout_s: float | None,
        *,
        expires_at: float | None = None,
        serializer: Callable[[Any], bytes] | None = None,
        deserializer: Callable[[bytes], M] | None = None,
    ) -> None:
        self._core = core
        self.admission = admission
        # Past the caller's own deadline the gateway stops the call itself and
        # then waits up to settle_timeout_s for the backend's report.
        timeout = None if caller_timeout_s is None else caller_timeout_s + core.settle_timeout_s
        metadata = core.backend_metadata(admission)
        lanes = pool_for(channel, f"{admission.service}.{admission.method}")
        multicallable = _settled(
            channel, admission.service, admission.method, serializer, deserializer
        )

        def settled(timeout: float | None) -> Any:
            return multicallable(None, metadata=metadata, timeout=timeout)

        self._call: Any
        if lanes is not None:  # on a lane shared with other calls (gateway.lanes)
            self._call = lanes.call(
                f"{admission.service}.{admission.method}",
                metadata,
                timeout,
                serializer,
                deserializer,
                settled,
            )
        else:
            self._call = settled(timeout)
        self._request = request
        self._opened = time.monotonic()
        self._expires_at = expires_at
        """Event-loop time at which read() gives up (DeadlineExceeded); None: the
        transport enforces the caller's deadline itself (gRPC cancels the handler)."""
        self._expiry: asyncio.TimerHandle | None = None
        self._expired = False
        self._inbox: collections.deque[Any] = collections.deque()
        """Messages, then _EOF or the reader's exception."""
        self._waiting: asyncio.Future[None] | None = None
        """read() waits on it for a message (or the deadline)."""
        self._room: asyncio.Future[None] | None = None
        """The reader waits on it while the inbox is full."""
        self._reader: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._draining = False
        self._completed = False
        self._stop_code: grpc.StatusCode | None = None
        self._ended = False
        self._settled = False
        self.code: grpc.StatusCode | None = None
        self.gpu_seconds: float | None = None

    @property
    def request_id(self) -> str:
        """The id the ledger's request_id column and the logs know this call by."""
        return self.admission.request_id

    async def start(self) -> None:
        """Send the request (a failed backend shows in the first read)."""
        loop = asyncio.get_running_loop()
        if self._expires_at is not None:
            self._expiry = loop.call_at(self._expires_at, self._expire)
        with contextlib.suppress(Exception):
            await asyncio.shield(self._call.write(self._request))
        self._reader = loop.create_task(self._read_all())

    def _wake(self, future: asyncio.Future[None] | None) -> None:
        if future is not None and not future.done():
            future.set_result(None)

    def _expire(self) -> None:
        self._expired = True
        self._wake(self._waiting)

    async def _read_all(self) -> None:
        """The reader task: every message into the inbox, then _EOF or the error;
        while the call is being stopped, messages are dropped until the end."""
        read = self._call.read
        inbox = self._inbox
        try:
            while True:
                message = await read()
                if self._draining and message is not _EOF:
                    continue  # messages already on their way: nobody reads them now
                inbox.append(message)
                self._wake(self._waiting)
                if message is _EOF:
                    return
                while len(inbox) >= _INBOX and not self._draining:
                    self._room = asyncio.get_running_loop().create_future()
                    await self._room
        except Exception as error:
            self._failure = error
            inbox.append(error)
            self._wake(self._waiting)
        except asyncio.CancelledError as error:  # the channel closed, or settle gave up
            self._failure = error
            inbox.append(error)
            self._wake(self._waiting)
            raise

    def _end(self, code: grpc.StatusCode, trailers: Any) -> None:
        self._ended = True
        self.code = code
        self.gpu_seconds = _float(trailers, GPU_SECONDS_TRAILER)

    def _deadline_passed(self) -> DeadlineExceeded:
        self._stop_code = grpc.StatusCode.DEADLINE_EXCEEDED
        return DeadlineExceeded("the request's deadline passed before the reply ended")

    async def _next(self) -> Any:
        """The next item of the inbox, waiting for it if needed."""
        inbox = self._inbox
        if self._expired:
            raise self._deadline_passed()
        while not inbox:
            if self._reader is None:
                raise RuntimeError("read() before start()")
            self._waiting = asyncio.get_running_loop().create_future()
            try:
                await self._waiting  # a caller's cancel ends this wait, not the read
            finally:
                self._waiting = None
            if self._expired:
                raise self._deadline_passed()
        item = inbox[0]
        if item is _EOF or isinstance(item, BaseException):
            return item  # the end stays: a read after it sees it again
        inbox.popleft()
        self._wake(self._room)
        return item

    async def read(self) -> M | None:
        """The next message, or None at the end; raises the backend's AioRpcError,
        or DeadlineExceeded once the caller's deadline (expires_at) passes."""
        message = await self._next()
        if message is _EOF:
            self._end(grpc.StatusCode.OK, await self._call.trailing_metadata())
            return None
        if isinstance(message, BaseException):
            if isinstance(message, grpc.aio.AioRpcError):
                self._end(message.code(), message.trailing_metadata())
            raise message
        self._core.first_chunk(self.admission)
        return cast(M, message)

    def ready(self) -> list[M]:
        """The messages already in the inbox, taken without waiting, so that a
        front end whose client lags sends them in one write. The end or an error
        stays for read() to report, and once the caller's deadline has passed
        this takes nothing (read() raises it)."""
        inbox = self._inbox
        if self._expired or not inbox:
            return []
        taken = []
        while inbox:
            item = inbox[0]
            if item is _EOF or isinstance(item, BaseException):
                break
            taken.append(inbox.popleft())
        if taken:
            self._wake(self._room)
            self._core.first_chunk(self.admission)
        return cast(list[M], taken)

    def completed(self) -> None:
        """The front end has the whole reply (the backend's last message came) and
        has ended it for its caller: settle() then waits for the backend's own end
        (its trailer and what the call spent) instead of stopping the call."""
        self._completed = True

    @property
    def reply_complete(self) -> bool:
        """Whether completed() was called."""
        return self._completed

    async def rest(self, first: M | None) -> list[M]:
        """first and every message after it."""
        messages = []
        message = first
        while message is not None:
            messages.append(message)
            message = await self.read()
        return messages

    async def settle(self, code_if_stopped: grpc.StatusCode = grpc.StatusCode.CANCELLED) -> None:
        """Stop the call if it still runs (after completed(): wait for its end
        instead), learn what it spent, bill it, free the slot.

        Call it on every ending (it runs once), shielded from the caller's cancel."""
        if self._settled:
            return
        self._settled = True
        if self._expiry is not None:
            self._expiry.cancel()
        estimated = False
        try:
            if not self._ended and self._completed:
                await self._await_end()
            if not self._ended:
                self.code = self._stop_code or code_if_stopped
                await self._stop()
            estimated = self.gpu_seconds is None
            if estimated:
                self.gpu_seconds = await self._estimate()
        finally:  # whatever failed above, the call is billed what is known and freed
            if self._reader is not None and not self._reader.done():
                self._reader.cancel()
            code = self.code or code_if_stopped
            await self._core.finish(self.admission, code, self.gpu_seconds, estimated=estimated)

    async def _await_end(self) -> None:
        """After the last message: the backend's trailer, up to the settle timeout
        (past it, or on anything unexpected, the call is stopped as any other)."""
        self._draining = True  # whatever still came would be read by nobody
        self._wake(self._room)
        reader = self._reader
        if reader is None:
            return
        await asyncio.wait({reader}, timeout=self._core.settle_timeout_s)
        end = self._inbox[-1] if reader.done() and self._inbox else None
        with contextlib.suppress(Exception):
            if end is _EOF:
                self._end(grpc.StatusCode.OK, await self._call.trailing_metadata())
            elif isinstance(end, grpc.aio.AioRpcError):
                self._end(end.code(), end.trailing_metadata())

    async def _stop(self) -> None:
        """Half-close ("stop now") and wait for the backend's trailer."""
        self._draining = True
        self._inbox.clear()
        self._wake(self._room)
        if self._reader is None:  # stopped before start(): read the backend's ending anyway
            self._reader = asyncio.get_running_loop().create_task(self._read_all())
        trailers: Any = ()
        try:
            async with asyncio.timeout(self._core.settle_timeout_s):
                with contextlib.suppress(Exception):
                    await self._call.done_writing()
                await self._reader  # it reads (and drops) until the end
            if isinstance(self._failure, grpc.aio.AioRpcError):
                trailers = self._failure.trailing_metadata()
            elif self._failure is None:
                trailers = await self._call.trailing_metadata()
        except TimeoutError:
            self._call.cancel()
        except (Exception, asyncio.CancelledError):
            # The channel closed under it (the gateway is stopping): estimate, unless
            # this very task is being cancelled.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        self.gpu_seconds = _float(trailers, GPU_SECONDS_TRAILER)

    async def _estimate(self) -> float:
        """No report (the backend died, or never answered): elapsed time times the
        device share it announced; nothing if it never started the call."""
        try:
            async with asyncio.timeout(0.5):
                initial = await self._call.initial_metadata()
        except Exception:
            return 0.0
        share = _float(initial, DEVICE_SHARE_HEADER)
        return 0.0 if share is None else share * (time.monotonic() - self._opened)
