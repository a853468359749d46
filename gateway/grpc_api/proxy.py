"""gRPC pass-through of VisionService and DiffusionService to the backends.

Messages travel as bytes (never parsed), so a streamed chunk costs one read
and one write. Around each call the core admits it and finishes it on every
ending. Metered calls (Chat, Generate) go through the one metered-call
lifecycle of :mod:`gateway.calls`: a caller's cancel or deadline stops the
backend's work, the backend reports what the call spent, and only then is it
billed and the slot freed. Other calls carry the caller's deadline upstream,
and a caller's cancel cancels them. A backend's status (with its google.rpc
details) comes back unchanged.

Backend channels balance round-robin over every address a target resolves
to (``dns:///vision-headless:50052`` on Kubernetes, or ``ipv4:a:p,b:p``) and
skip addresses whose grpc.health.v1 check is not SERVING.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from dreamsight_server.interceptors import abort_with, maps_own_errors
from dreamsight_server.metadata import REQUEST_ID_HEADER
from gateway.calls import MeteredCall
from gateway.core import Admission, GatewayCore
from gateway.training import TRAINING_METHODS, TrainingMeter, watched_job_id

# Calls that run a model: they need a concurrency slot and budget, and are billed.
METERED_METHODS = frozenset({"Chat", "Generate"})
_PASSED_TRAILERS = frozenset({"grpc-status-details-bin", "retry-after"})

Context = grpc.aio.ServicerContext[Any, Any]


def backend_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """TLS (and with cert and key, mTLS) credentials for backend channels."""
    if not ca:
        return None
    chain = Path(cert).read_bytes() if cert else None
    private = Path(key).read_bytes() if key else None
    return grpc.ssl_channel_credentials(Path(ca).read_bytes(), private, chain)


def backend_channel(
    target: str,
    max_message_bytes: int,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str = "",
) -> grpc.aio.Channel:
    """A channel that balances per call over healthy backend addresses."""
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
    }
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.enable_retries", 0),
        # Find a restarted backend quickly (the default first backoff is 1 s).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)


def _metadata(context: Context) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


async def _pass_error(context: Context, error: grpc.aio.AioRpcError) -> None:
    if context.cancelled() or context.done():
        return  # the caller left first; nothing to pass on
    received: Any = error.trailing_metadata() or ()
    trailers = tuple((k, v) for k, v in received if k in _PASSED_TRAILERS)
    await context.abort(error.code(), error.details() or "", trailers)


class ServiceProxy:
    """Generic handlers forwarding one proto service to one backend channel."""

    def __init__(
        self,
        descriptor: ServiceDescriptor,
        channel: grpc.aio.Channel,
        core: GatewayCore,
        training: TrainingMeter | None = None,
    ) -> None:
        self._descriptor = descriptor
        self._channel = channel
        self._core = core
        self._service = descriptor.name
        self._training = training

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The generic handler to add to the gateway's server."""
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in self._descriptor.methods:
            path = f"/{self._descriptor.full_name}/{method.name}"
            training = self._training if method.name in TRAINING_METHODS else None
            if method.name in METERED_METHODS:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    self._metered(method.name)
                )
            elif method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    self._streaming(path, method.name, training)
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._unary(path, method.name, training)
                )
        return grpc.method_handlers_generic_handler(self._descriptor.full_name, handlers)

    async def _admit(
        self, context: Context, method: str, metered: bool, budget_only: bool = False
    ) -> Admission | None:
        """Admit the call, or end it with the mapped error and return None."""
        metadata = _metadata(context)
        try:
            return await self._core.admit(
                metadata.get("authorization"),
                self._service,
                method,
                metadata.get(REQUEST_ID_HEADER),
                metered=metered,
                budget_only=budget_only,
            )
        except Exception as error:
            await abort_with(context, error, f"{self._service}/{method}", self._core.errors)
            return None

    def _backend_metadata(
        self, admission: Admission, training: TrainingMeter | None
    ) -> tuple[tuple[str, str], ...]:
        if training is not None:  # the tier's training-job limit goes upstream too
            return training.metadata(admission)
        return self._core.backend_metadata(admission)

    def _streaming(self, path: str, method: str, training: TrainingMeter | None) -> Any:
        """An unmetered stream (WatchTrainingJob): a job seen ending gets billed."""
        multicallable = self._channel.unary_stream(path, None, None)
        core = self._core

        @maps_own_errors
        async def forward(request: bytes, context: Context) -> AsyncIterator[bytes]:
            admission = await self._admit(context, method, False)
            if admission is None:
                return
            code = grpc.StatusCode.UNKNOWN
            call = multicallable(
                request,
                metadata=self._backend_metadata(admission, training),
                timeout=context.time_remaining(),
            )
            try:
                async for chunk in call:
                    if training is not None:
                        await training.observe(admission, method, chunk)
                    yield chunk
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                code = error.code()
                await _pass_error(context, error)
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                call.cancel()
                raise
            finally:
                if training is not None and admission.watched_job_ended:
                    job_id = watched_job_id(request)
                    await asyncio.shield(training.after_watch(admission, job_id))
                await asyncio.shield(core.finish(admission, code, None))

        return forward

    def _metered(self, method: str) -> Any:
        """Chat and Generate: the one metered-call lifecycle (gateway.calls)."""
        core = self._core

        @maps_own_errors
        async def forward(request: bytes, context: Context) -> AsyncIterator[bytes]:
            admission = await self._admit(context, method, True)
            if admission is None:
                return
            call: MeteredCall[bytes] = MeteredCall(
                core, admission, self._channel, request, context.time_remaining()
            )
            try:
                await call.start()
                while (chunk := await call.read()) is not None:
                    yield chunk
            except grpc.aio.AioRpcError as error:
                # The backend ended the call: bill it and free the slot before the
                # caller hears, so that a retry never finds its own slot still held.
                await core.settle(call.settle())
                await _pass_error(context, error)
            finally:
                remaining = context.time_remaining()
                ending = (
                    grpc.StatusCode.DEADLINE_EXCEEDED
                    if remaining is not None and remaining <= 0
                    else grpc.StatusCode.CANCELLED
                )
                await core.settle(call.settle(ending))

        return forward

    def _unary(self, path: str, method: str, training: TrainingMeter | None) -> Any:
        """An unmetered call; training calls bill any ended job in the reply, and a
        new job's budget check first sees the tenant's jobs that ended unbilled."""
        multicallable = self._channel.unary_unary(path, None, None)
        core = self._core
        budget_only = training is not None and method == "CreateTrainingJob"

        @maps_own_errors
        async def forward(request: bytes, context: Context) -> bytes | None:
            if training is not None:
                await training.before_admission(method, _metadata(context).get("authorization"))
            admission = await self._admit(context, method, False, budget_only)
            if admission is None:
                return None
            code = grpc.StatusCode.UNKNOWN
            call = multicallable(
                request,
                metadata=self._backend_metadata(admission, training),
                timeout=context.time_remaining(),
            )
            try:
                response: bytes = await call
                code = grpc.StatusCode.OK
                if training is not None:
                    await training.observe(admission, method, response)
                return response
            except grpc.aio.AioRpcError as error:
                code = error.code()
                await _pass_error(context, error)
                return None
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                call.cancel()
                raise
            finally:
                await asyncio.shield(core.finish(admission, code, None))

        return forward


def proxies(
    core: GatewayCore,
    routes: Iterable[tuple[ServiceDescriptor, grpc.aio.Channel, TrainingMeter | None]],
) -> list[grpc.GenericRpcHandler[Any, Any]]:
    """Generic handlers for every proxied service."""
    return [ServiceProxy(d, channel, core, training).handler() for d, channel, training in routes]
