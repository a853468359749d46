"""Lifecycle of the diffusion service: serve, load, mark healthy, drain, stop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from prometheus_client import CollectorRegistry

from diffusion_service.config import DiffusionSettings
from diffusion_service.engine import DiffusersEngine
from diffusion_service.metrics import DiffusionMetrics
from diffusion_service.servicer import DiffusionServicer
from dreamsight_server.errors import ErrorTable
from dreamsight_server.lifecycle import GrpcServer, on_shutdown_signals

log = logging.getLogger(__name__)
SERVICE_NAME = diffusion_pb2.DESCRIPTOR.services_by_name["DiffusionService"].full_name


@dataclass
class DiffusionService:
    """A running diffusion service: the gRPC server and its engine."""

    settings: DiffusionSettings
    server: GrpcServer
    engine: DiffusersEngine
    metrics: DiffusionMetrics

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.server.port

    async def load(self) -> None:
        """Load the default model, then report SERVING."""
        await self.engine.start()
        await self.server.set_serving(True)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, drain streams within the grace period, stop the engine."""
        await self.server.stop(grace_s)
        self.engine.shutdown()


def prepare_model(settings: DiffusionSettings) -> None:
    """Build the tiny demo pipeline on first run when the settings point at one.

    A missing local directory whose name ends in ``-demo`` is built; any other
    source is left to diffusers (a hub id or an existing directory).
    """
    for model in settings.models:
        path = Path(model.source)
        if settings.build_demo_model and not path.exists() and path.name.endswith("-demo"):
            from diffusion_service import demo_model

            log.info("building the demo Stable Diffusion (random weights) into %s", path)
            demo_model.build(path)


async def start_service(
    settings: DiffusionSettings, registry: CollectorRegistry | None = None
) -> DiffusionService:
    """Start serving (NOT_SERVING) without loading the model yet."""
    await asyncio.to_thread(prepare_model, settings)
    registry = registry or CollectorRegistry()
    metrics = DiffusionMetrics(registry)
    errors = ErrorTable()
    engine = DiffusersEngine(settings, metrics)
    server = GrpcServer(settings.server, [SERVICE_NAME], registry, errors)
    # The training RPCs are the DreamBooth issue's; until then they stay
    # abstract in the generated stub; the training RPCs come with DreamBooth.
    servicer = DiffusionServicer(engine, settings, metrics, errors)  # type: ignore[abstract]
    diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(servicer, server.server)
    await server.start()
    return DiffusionService(settings, server, engine, metrics)


async def run(settings: DiffusionSettings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    service = await start_service(settings)
    stopping = asyncio.Event()
    on_shutdown_signals(stopping.set)
    log.info("diffusion listening on %s:%d (loading model)", settings.server.host, service.port)
    loader = asyncio.create_task(service.load())
    stopper = asyncio.create_task(stopping.wait())
    await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader.done() and loader.exception() is not None:
        # Without its default model the service can never serve: exit, so
        # the supervisor (Kubernetes, the one-machine launcher) sees it.
        log.error("loading the default model failed", exc_info=loader.exception())
        stopper.cancel()
        await service.stop(0)
        raise SystemExit(1)
    await stopper
    log.info("diffusion shutting down (grace %.0fs)", settings.server.grace_s)
    loader.cancel()
    await service.stop()
