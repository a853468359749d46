"""Lifecycle of the vision service: serve, load, mark healthy, drain, stop."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc
from prometheus_client import CollectorRegistry

from dreamsight_server.errors import ErrorTable
from dreamsight_server.lifecycle import GrpcServer, on_shutdown_signals
from vision_service.config import VisionSettings
from vision_service.engine import VllmChatEngine
from vision_service.metrics import VisionMetrics
from vision_service.servicer import VisionServicer

log = logging.getLogger(__name__)
SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name


@dataclass
class VisionService:
    """A running vision service: the gRPC server and its engine."""

    settings: VisionSettings
    server: GrpcServer
    engine: VllmChatEngine
    metrics: VisionMetrics

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.server.port

    async def load(self) -> None:
        """Load the model, then report SERVING."""
        await self.engine.start()
        await self.server.set_serving(True)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, drain streams within the grace period, stop the engine."""
        await self.server.stop(grace_s)
        self.engine.shutdown()


def prepare_model(settings: VisionSettings) -> None:
    """Put the tiny demo model in place on first run when the settings point at one.

    A missing local directory whose name ends in ``-demo`` gets the trained
    demo model committed with the source (``models/llava-shapes``), or, where
    the tree has none, a random-weight one built on the spot; any other model
    name is left to vLLM (a hub id or an existing directory).
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{settings.kv_cache_gib:g}")
    path = Path(settings.model)
    if settings.build_demo_model and not path.exists() and path.name.endswith("-demo"):
        from dreamsight_server import demo_weights

        if demo_weights.install("llava", path):
            log.info("copied the trained demo LLaVA (shapes) into %s", path)
            return
        from vision_service import demo_model

        log.info("building the demo LLaVA (random weights) into %s", path)
        demo_model.build(path)


async def start_service(
    settings: VisionSettings, registry: CollectorRegistry | None = None
) -> VisionService:
    """Start serving (NOT_SERVING) without loading the model yet."""
    prepare_model(settings)
    registry = registry or CollectorRegistry()
    metrics = VisionMetrics(registry)
    errors = ErrorTable()
    engine = VllmChatEngine(settings, metrics)
    server = GrpcServer(settings.server, [SERVICE_NAME], registry, errors)
    vision_pb2_grpc.add_VisionServiceServicer_to_server(
        VisionServicer(engine, settings, metrics, errors), server.server
    )
    await server.start()
    return VisionService(settings, server, engine, metrics)


async def run(settings: VisionSettings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    service = await start_service(settings)
    stopping = asyncio.Event()
    on_shutdown_signals(stopping.set)
    log.info("vision listening on %s:%d (loading model)", settings.server.host, service.port)
    loader = asyncio.create_task(service.load())
    await stopping.wait()
    log.info("vision shutting down (grace %.0fs)", settings.server.grace_s)
    loader.cancel()
    await service.stop()
