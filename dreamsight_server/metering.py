"""How a backend tells the gateway what a call spent, however the call ends.

The gateway never calls a metered method (``VisionService.Chat``,
``DiffusionService.Generate``) as its public unary-stream form. It calls the
method's *settled* twin, a bidirectional stream at
``/dreamsight.internal.v1.Settled/<Service>.<Method>``: it sends the one
request and keeps its side of the stream open. Closing its side (a
half-close) means "stop now": its caller cancelled, disconnected or ran out
of time. However the call ends (done, failed, stopped, or out of its
GPU-second allowance), the backend waits until its work has really stopped
(a diffusion step in flight included), then ends the stream with the
GPU-seconds the call spent in the ``x-dreamsight-gpu-seconds`` trailer. The
gateway bills that trailer and only then gives the tenant's slot back.

Chats usually travel on a lane instead (:mod:`dreamsight_server.lanes`):
one stream carrying many settled calls, each with this same contract, its
"stop now" and its report being messages of the lane.

Why on the same stream, not by a gRPC cancel plus a separate "what did call X
spend" RPC: a cancelled call carries no trailer back, and a separate RPC can
land on another replica behind the gateway's round-robin balancer. The
stream's own trailer always comes from the replica that did the work.

A backend that dies mid-call sends no trailer; the gateway then bills an
estimate from the elapsed time and the device share the backend announced in
the ``x-dreamsight-device-share`` initial metadata, marked as an estimate.

Each settled call leaves one log line, ``settled <Service>/<Method>
tenant=... request_id=... gpu_seconds=... ended=ok|error|stopped``: the
backend's own account of what it billed, to audit the gateway's ledger by.

Engines report what they spend with :func:`report` and read the call's
allowance with :func:`allowance`; both go through a context variable set for
the duration of the call, so engine code stays free of transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from dreamsight_server.errors import ErrorTable
from dreamsight_server.interceptors import abort_with, request_id_var
from dreamsight_server.metadata import (
    DEVICE_SHARE_HEADER,
    GPU_ALLOWANCE_HEADER,
    REQUEST_ID_HEADER,
    TENANT_HEADER,
    gpu_seconds_trailer,
)

log = logging.getLogger(__name__)

SETTLED_SERVICE = "dreamsight.internal.v1.Settled"
"""The internal service of settled twins (registered by each backend, not in protos/)."""

Context = grpc.aio.ServicerContext[Any, Any]
Behavior = Callable[[Any, Context], AsyncIterator[Any]]


def settled_path(service: str, method: str) -> str:
    """The full method name of a metered method's settled twin."""
    return f"/{SETTLED_SERVICE}/{service}.{method}"


@dataclass
class CallUsage:
    """What one call spent, and may spend."""

    allowance: float | None = None
    """GPU-seconds the call may use (from the tenant's remaining budget); None: no limit."""
    gpu_seconds: float = 0.0


_usage: ContextVar[CallUsage | None] = ContextVar("dreamsight_call_usage", default=None)


def report(gpu_seconds: float) -> None:
    """Add GPU-seconds the current call spent (a no-op outside a settled call)."""
    usage = _usage.get()
    if usage is not None:
        usage.gpu_seconds += gpu_seconds


def allowance() -> float | None:
    """The current call's GPU-second allowance, if the gateway set one."""
    usage = _usage.get()
    return usage.allowance if usage is not None else None


def _allowance(context: Context) -> float | None:
    for key, value in context.invocation_metadata() or ():
        if key == GPU_ALLOWANCE_HEADER and isinstance(value, str):
            with contextlib.suppress(ValueError):
                seconds = float(value)
                if math.isfinite(seconds) and seconds >= 0:
                    return seconds
    return None


def _metadata_value(context: Context, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name and isinstance(value, str):
            return value[:128]
    return ""


@dataclass
class Settlement:
    """How a settled call ended, and what it spent."""

    usage: CallUsage
    stopped: bool
    """The gateway stopped it (or went away) before it ended by itself."""
    error: BaseException | None
    """What the behaviour raised, if it failed."""

    @property
    def trailer(self) -> tuple[tuple[str, str]]:
        """The GPU-seconds trailer every ending carries."""
        return gpu_seconds_trailer(self.usage.gpu_seconds)


async def run_settled(
    behavior: Behavior,
    request: Any,
    context: Context,
    write: Callable[[Any], Awaitable[None]],
    stop: Awaitable[Any],
    name: str,
) -> Settlement:
    """Run one settled call: its behaviour, with the call's allowance and usage
    in the context variable engines report to, writing each message with
    write, until it ends or stop completes (the gateway's "stop now"); then
    wait until its work has really stopped and log what it spent.

    The behaviour runs in the calling task, not a task of its own: under load
    each task's start waits a turn of the busy event loop, a millisecond on
    the way to the engine (docs/benchmarks.md, twelfth round). A stop cancels
    the calling task while the behaviour runs, and the cancellation ends here;
    the call ends as it did in a task of its own (stopped, failed, done, or
    cancelled from outside). A context variable the behaviour sets stays set
    in the calling task: behaviours leave them alone (the usage is set here)."""
    request_id_var.set(_metadata_value(context, REQUEST_ID_HEADER))
    usage = CallUsage(allowance=_allowance(context))
    task = asyncio.current_task()
    assert task is not None, "run_settled runs in a task"
    base = task.cancelling()  # cancellations asked of the task before the call
    running, asked, stopped = True, False, False

    def stop_now(_: object) -> None:
        nonlocal asked
        if running and not asked:
            asked = True
            task.cancel()  # stop now; the engine waits for its work to stop

    stopping = asyncio.ensure_future(stop)
    stopping.add_done_callback(_retrieve)
    stopping.add_done_callback(stop_now)
    error: Exception | None = None
    token = _usage.set(usage)
    caught = False
    try:
        await _pump(behavior(request, context), write)
    except asyncio.CancelledError:
        caught = True
        if asked:
            task.uncancel()
        if task.cancelling() > base:
            raise  # the caller itself was cancelled too (the gateway went away)
        stopped = True  # by the gateway, or something the behaviour awaited was
    except Exception as failure:
        error = failure
    finally:
        running = False
        if asked and not caught:
            task.uncancel()  # the behaviour swallowed the stop: it ended by itself
        _usage.reset(token)
        stopping.cancel()
    if task.cancelling() > base:  # cancelled from outside, and the behaviour swallowed it
        raise asyncio.CancelledError
    ended = "stopped" if stopped else "error" if error is not None else "ok"
    log.info(
        "settled %s tenant=%s request_id=%s gpu_seconds=%r ended=%s",
        name,
        _metadata_value(context, TENANT_HEADER),
        request_id_var.get(),
        usage.gpu_seconds,
        ended,
    )
    return Settlement(usage, stopped, error)


def settled_handler(
    behavior: Behavior,
    request_type: Any,
    response_type: Any,
    table: ErrorTable,
    device_share: Callable[[], float],
    name: str,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The settled twin of a unary-stream servicer method (see the module doc)."""

    async def handle(_: Any, context: Context) -> None:
        await context.send_initial_metadata(((DEVICE_SHARE_HEADER, repr(device_share())),))
        request = await context.read()
        if request is grpc.aio.EOF:  # type: ignore[attr-defined]
            context.set_trailing_metadata(gpu_seconds_trailer(0.0))
            return  # stopped before it began: nothing spent
        # The stop read returns at the gateway's half-close.
        settled = await run_settled(behavior, request, context, context.write, context.read(), name)
        if isinstance(settled.error, Exception):
            await abort_with(context, settled.error, name, table, extra_trailers=settled.trailer)
            return
        context.set_trailing_metadata(settled.trailer)
        if settled.stopped:
            context.set_code(grpc.StatusCode.CANCELLED)
            context.set_details("stopped by the gateway")

    return grpc.stream_stream_rpc_method_handler(
        handle,
        request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString,
    )


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a finished read's outcome as seen (a gateway gone mid-read is normal)."""
    if not task.cancelled():
        task.exception()


async def _pump(events: AsyncIterator[Any], write: Callable[[Any], Awaitable[None]]) -> None:
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            await write(event)


def settled_handlers(
    service: str,
    methods: dict[str, tuple[Behavior, Any, Any]],
    table: ErrorTable,
    device_share: Callable[[], float],
) -> grpc.GenericRpcHandler[Any, Any]:
    """The settled twins of a backend's metered methods, as one generic handler."""
    handlers = {
        f"{service}.{method}": settled_handler(
            behavior, request, response, table, device_share, f"{service}/{method}"
        )
        for method, (behavior, request, response) in methods.items()
    }
    return grpc.method_handlers_generic_handler(SETTLED_SERVICE, handlers)
