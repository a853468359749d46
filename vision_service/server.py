"""Lifecycle of the vision service: serve, load, mark healthy, drain, stop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc
from prometheus_client import CollectorRegistry

from dreamsight_server.errors import ErrorTable
from dreamsight_server.lanes import LaneServer
from dreamsight_server.lifecycle import GrpcServer
from dreamsight_server.metering import settled_handlers
from vision_service import placement
from vision_service.config import VisionSettings
from vision_service.engine import VllmChatEngine
from vision_service.metrics import VisionMetrics
from vision_service.servicer import VisionServicer

log = logging.getLogger(__name__)
SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name
SHIFT_INTERVAL_S = 0.05
"""How often the engine's load is looked at, to place its engine core."""


@dataclass
class VisionService:
    """A running vision service: the gRPC server and its engine."""

    settings: VisionSettings
    server: GrpcServer
    engine: VllmChatEngine
    metrics: VisionMetrics
    lanes: LaneServer
    own_process: bool = False
    """Whether it runs as its own process (python -m vision_service), which it
    may then place on the machine's cores (vision_service/placement.py)."""
    _shifting: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    """Moves vLLM's engine core with the engine's load (placement.EngineCoreShift)."""

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.server.port

    async def load(self) -> None:
        """Load the model, then report SERVING."""
        await self.engine.start()
        if self.own_process:
            self.engine.cache_vllm_environment()
            log.info("vLLM's environment variables are read once from now on")
        if self.own_process and self.settings.place_off_workers and self.engine.on_cpu:
            shift = placement.EngineCoreShift.find(free=placement.keep_off_workers())
            if shift is not None:
                self._shifting = asyncio.get_running_loop().create_task(self._follow(shift))
        await self.server.set_serving(True)

    async def _follow(self, shift: placement.EngineCoreShift) -> None:
        """Move the engine core as the engine's load changes (placement.EngineCoreShift)."""
        while True:
            shift.update(self.engine.meter.running)
            await asyncio.sleep(SHIFT_INTERVAL_S)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, drain streams within the grace period, stop the engine."""
        if self._shifting is not None:
            self._shifting.cancel()
        self.lanes.retire()  # the gateway opens no more chats here
        await self.server.stop(grace_s)
        self.engine.shutdown()


async def start_service(
    settings: VisionSettings,
    registry: CollectorRegistry | None = None,
    *,
    own_process: bool = False,
) -> VisionService:
    """Start serving (NOT_SERVING) without loading the model yet; own_process:
    the service is the process (its entry point), not a part of another one."""
    registry = registry or CollectorRegistry()
    metrics = VisionMetrics(registry)
    errors = ErrorTable()
    engine = VllmChatEngine(settings, metrics)
    server = GrpcServer(settings.server, [SERVICE_NAME], registry, errors)
    servicer = VisionServicer(engine, settings, metrics, errors)
    vision_pb2_grpc.add_VisionServiceServicer_to_server(servicer, server.server)
    chat = (servicer.Chat, vision_pb2.ChatRequest, vision_pb2.ChatResponse)
    devices = float(settings.tensor_parallel_size)

    def device_share() -> float:
        return devices / (engine.meter.running + 1)  # sharing with those running

    lanes = LaneServer(
        "VisionService", {"Chat": chat}, errors, device_share, settings.gateway_secret
    )
    server.server.add_generic_rpc_handlers(
        (settled_handlers("VisionService", {"Chat": chat}, errors, device_share), lanes.handler())
    )
    await server.start()
    return VisionService(settings, server, engine, metrics, lanes, own_process)
