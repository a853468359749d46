"""One lifecycle for every metered call the gateway forwards (Chat, Generate),
whichever front end admitted it: the gRPC pass-through and both HTTP APIs.

admit (in the core) -> call the backend's settled twin -> read messages ->
settle. Settling happens on every ending, exactly once: on a normal end or a
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
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

import grpc

from dreamsight_server.errors import DeadlineExceeded
from dreamsight_server.metadata import DEVICE_SHARE_HEADER, GPU_SECONDS_TRAILER
from dreamsight_server.metering import settled_path
from gateway.core import Admission, GatewayCore

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


class MeteredCall(Generic[M]):
    """One admitted metered call upstream, from its first message to its bill."""

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
        path = settled_path(admission.service, admission.method)
        self._call: Any = channel.stream_stream(path, serializer, deserializer)(
            None, metadata=core.backend_metadata(admission), timeout=timeout
        )
        self._request = request
        self._opened = time.monotonic()
        self._expires_at = expires_at
        """Event-loop time at which read() gives up (DeadlineExceeded); None: the
        transport enforces the caller's deadline itself (gRPC cancels the handler)."""
        self._reading: asyncio.Future[Any] | None = None
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
        with contextlib.suppress(Exception):
            await asyncio.shield(self._call.write(self._request))

    def _end(self, code: grpc.StatusCode, trailers: Any) -> None:
        self._ended = True
        self.code = code
        self.gpu_seconds = _float(trailers, GPU_SECONDS_TRAILER)

    async def _read_raw(self, timeout: float | None = None) -> Any:
        """The next read, in a task of its own: cancelling grpc's read would cancel
        the whole call (and its trailer), so a caller's cancel only stops the wait."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._call.read())
        if timeout is None:
            message = await asyncio.shield(self._reading)
        else:
            done, _ = await asyncio.wait({self._reading}, timeout=timeout)
            if not done:
                raise TimeoutError
            message = self._reading.result()
        self._reading = None
        return message

    async def read(self) -> M | None:
        """The next message, or None at the end; raises the backend's AioRpcError,
        or DeadlineExceeded once the caller's deadline (expires_at) passes."""
        timeout = None
        if self._expires_at is not None:
            timeout = max(0.0, self._expires_at - asyncio.get_running_loop().time())
        try:
            message = await self._read_raw(timeout)
        except grpc.aio.AioRpcError as error:
            self._end(error.code(), error.trailing_metadata())
            raise
        except TimeoutError:
            self._stop_code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise DeadlineExceeded("the request's deadline passed before the reply ended") from None
        if message is _EOF:
            self._end(grpc.StatusCode.OK, await self._call.trailing_metadata())
            return None
        self._core.first_chunk(self.admission)
        return cast(M, message)

    async def rest(self, first: M | None) -> list[M]:
        """first and every message after it."""
        messages = []
        message = first
        while message is not None:
            messages.append(message)
            message = await self.read()
        return messages

    async def settle(self, code_if_stopped: grpc.StatusCode = grpc.StatusCode.CANCELLED) -> None:
        """Stop the call if it still runs, learn what it spent, bill it, free the slot.

        Call it on every ending (it runs once), shielded from the caller's cancel."""
        if self._settled:
            return
        self._settled = True
        estimated = False
        try:
            if not self._ended:
                self.code = self._stop_code or code_if_stopped
                await self._stop()
            estimated = self.gpu_seconds is None
            if estimated:
                self.gpu_seconds = await self._estimate()
        finally:  # whatever failed above, the call is billed what is known and freed
            code = self.code or code_if_stopped
            await self._core.finish(self.admission, code, self.gpu_seconds, estimated=estimated)

    async def _stop(self) -> None:
        """Half-close ("stop now") and wait for the backend's trailer."""
        trailers: Any = ()
        try:
            async with asyncio.timeout(self._core.settle_timeout_s):
                with contextlib.suppress(Exception):
                    await self._call.done_writing()
                while await self._read_raw() is not _EOF:
                    pass  # messages already on their way: nobody reads them now
                trailers = await self._call.trailing_metadata()
        except grpc.aio.AioRpcError as error:
            trailers = error.trailing_metadata()
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
