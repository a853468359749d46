"""The gRPC server lifecycle every service shares.

Build with :class:`GrpcServer`, ``await start()`` (health NOT_SERVING, so a
load balancer waits while the model loads), mark it serving once the engine
is ready, and ``await stop()`` on SIGTERM: health goes NOT_SERVING, new calls
are refused, in-flight streams get ``grace_s`` to finish, then the caller
shuts its engine down. Health (grpc.health.v1), server reflection, the
error-mapping interceptor and the Prometheus endpoint are wired here once.
:func:`serve` is the one run loop of every service (load, serve, drain, stop,
exit 1 when loading fails) and :func:`main` the one ``python -m`` entry point.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from dreamsight_server.errors import ErrorTable
from dreamsight_server.interceptors import ErrorMappingInterceptor
from dreamsight_server.settings import SettingsError, group, parse_or_exit, setting

log = logging.getLogger(__name__)
S = TypeVar("S")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS port; with ``client_ca`` the peer must present a
    certificate it signed (mTLS, e.g. between gateway and backends)."""

    cert: str = setting(
        "", "PEM certificate of this service's port (with the key); empty: plaintext"
    )
    key: str = setting("", "PEM private key of that certificate")
    client_ca: str = setting("", "PEM CA; when set, callers must present a certificate it signed")

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for a server port."""
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        pair = [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())]
        return grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=bool(ca))

    def ssl_context(self) -> ssl.SSLContext:
        """The same for an HTTP port (the gateway's Ollama and OpenAI APIs)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def tls_files(files: TlsFiles) -> TlsFiles | None:
    """The files when a certificate is configured, else None (plaintext)."""
    if not files.cert and not files.key:
        return None
    if not files.cert or not files.key:
        raise SettingsError("--tls-cert and --tls-key: TLS needs both a certificate and a key")
    return files


@dataclass(frozen=True)
class ServerOptions:
    """Network settings of one gRPC service: the flags every service shares."""

    host: str = setting("127.0.0.1", "address the gRPC (and metrics) ports listen on")
    port: int = setting(0, "gRPC port; 0 picks a free one", minimum=0)
    metrics_port: int | None = setting(
        0, "Prometheus /metrics port; 0 picks a free one, off turns it off", minimum=0
    )
    grace_s: float = setting(
        30.0, "seconds in-flight calls get to finish after SIGTERM", flag="grace-seconds", minimum=0
    )
    max_receive_bytes: int = 4 * 1024 * 1024
    """Largest request message (set by each service from its own limits)."""
    max_pending_requests: int = 10_000
    tls: TlsFiles | None = group(lambda: None, prefix="tls-", build=tls_files)
    """Serve TLS with these files instead of plaintext."""


class GrpcServer:
    """One grpc.aio server with health, reflection, errors and metrics."""

    def __init__(
        self,
        options: ServerOptions,
        service_names: Sequence[str],
        registry: CollectorRegistry,
        error_table: ErrorTable | None = None,
        extra_interceptors: Sequence[Any] = (),
    ) -> None:
        self.options = options
        self.registry = registry
        self._service_names = list(service_names)
        self.server = grpc.aio.server(
            interceptors=[*extra_interceptors, ErrorMappingInterceptor(error_table)],
            options=[
                ("grpc.max_receive_message_length", options.max_receive_bytes),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.server.max_pending_requests", options.max_pending_requests),
                # Close each connection after 5 minutes (streams get an hour to end),
                # so clients re-resolve DNS and spread onto new replicas.
                ("grpc.max_connection_age_ms", 5 * 60 * 1000),
                ("grpc.max_connection_age_grace_ms", 60 * 60 * 1000),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0
        self.metrics_port: int | None = None
        self._metrics_server: Any = None

    async def start(self) -> int:
        """Bind, start serving (health NOT_SERVING) and return the bound port."""
        address = f"{self.options.host}:{self.options.port}"
        if self.options.tls is not None:
            self.port = self.server.add_secure_port(address, self.options.tls.server_credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {self.options.host}:{self.options.port}")
        await self.set_serving(False)
        await self.server.start()
        if self.options.metrics_port is not None:
            self._metrics_server, _ = start_http_server(
                self.options.metrics_port, addr=self.options.host, registry=self.registry
            )
            self.metrics_port = int(self._metrics_server.server_port)
        log.info("serving %s on %s:%d", self._service_names, self.options.host, self.port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the server and each service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, drain, stop."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.options.grace_s if grace_s is None else grace_s)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    async def wait_for_termination(self) -> None:
        """Block until the server has stopped."""
        await self.server.wait_for_termination()


class Service(Protocol):
    """A started service as :func:`serve` runs it (vision, diffusion, the gateway)."""

    server: GrpcServer

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        ...

    async def load(self) -> None:
        """Load what the service needs (its model), then report SERVING."""
        ...

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, drain in-flight calls within the grace period, stop."""
        ...


async def serve(name: str, start: Callable[[], Awaitable[Service]]) -> None:
    """Start a service, load it, serve until SIGTERM or SIGINT, then drain and stop.

    A load that fails exits the process with status 1 and the cause logged:
    a service that cannot load its model can never serve, and its supervisor
    (Kubernetes, ``dreamsight up``) must see that rather than a process that
    stays NOT_SERVING forever.
    """
    service = await start()
    stopping = asyncio.Event()
    on_shutdown_signals(stopping.set)
    log.info("%s listening on %s:%d (loading)", name, service.server.options.host, service.port)
    loader = asyncio.create_task(service.load())
    stopper = asyncio.create_task(stopping.wait())
    await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader.done() and not loader.cancelled() and loader.exception() is not None:
        log.error("%s failed to load; exiting", name, exc_info=loader.exception())
        stopper.cancel()
        await service.stop(0)
        raise SystemExit(1)
    await stopper
    log.info("%s shutting down", name)
    loader.cancel()
    await service.stop()


def main(
    name: str,
    parse_settings: Callable[[], S],
    start: Callable[[S], Awaitable[Service]],
    prepare: Callable[[S], object] | None = None,
    use_uvloop: Callable[[S], bool] = lambda _: False,
) -> None:
    """A service's ``python -m`` entry point: log, parse settings (a bad one
    exits 2 naming it), prepare the process (e.g. the torchvision hook), serve."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = parse_or_exit(parse_settings)
    if prepare is not None:
        prepare(settings)
    served = serve(name, lambda: start(settings))
    if use_uvloop(settings):
        import uvloop  # ~20% less CPU per proxied chunk than asyncio's loop

        uvloop.run(served)
    else:
        asyncio.run(served)


def on_shutdown_signals(callback: Callable[[], None]) -> None:
    """Call callback (once) on SIGTERM or SIGINT in the running loop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, callback)
