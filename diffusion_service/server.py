"""Lifecycle of the diffusion service: serve, load, mark healthy, drain, stop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from prometheus_client import CollectorRegistry

from diffusion_service.config import DiffusionSettings, TrainingSettings
from diffusion_service.dreambooth.params import Defaults, load_defaults
from diffusion_service.engine import DiffusersEngine
from diffusion_service.jobs.artifacts import FineTunedModels, JobFiles
from diffusion_service.jobs.manager import TrainingManager
from diffusion_service.jobs.store import open_store
from diffusion_service.metrics import DiffusionMetrics
from diffusion_service.registry import ModelRegistry
from diffusion_service.servicer import DiffusionServicer
from dreamsight_server.errors import ErrorTable
from dreamsight_server.lifecycle import GrpcServer
from dreamsight_server.metering import settled_handlers

log = logging.getLogger(__name__)
SERVICE_NAME = diffusion_pb2.DESCRIPTOR.services_by_name["DiffusionService"].full_name


@dataclass
class DiffusionService:
    """A running diffusion service: the gRPC server and its engines."""

    settings: DiffusionSettings
    server: GrpcServer
    engine: DiffusersEngine
    training: TrainingManager
    metrics: DiffusionMetrics

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.server.port

    async def load(self) -> None:
        """Load the default model, restore fine-tuned models and interrupted
        training jobs, then report SERVING."""
        await self.engine.start()
        await self.training.start()
        await self.server.set_serving(True)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, drain streams within the grace period while training
        workers checkpoint and stop (their jobs resume at the next start),
        then stop the engine."""
        await asyncio.gather(self.server.stop(grace_s), self.training.shutdown())
        self.engine.shutdown()


async def start_service(
    settings: DiffusionSettings, registry: CollectorRegistry | None = None
) -> DiffusionService:
    """Start serving (NOT_SERVING) without loading the model yet."""
    t = settings.training
    defaults = await asyncio.to_thread(load_defaults, t.defaults_file)
    check_defaults(defaults, t)
    registry = registry or CollectorRegistry()
    metrics = DiffusionMetrics(registry)
    errors = ErrorTable()
    store = open_store(t.store)
    files = JobFiles(t.artifacts_dir)
    models = ModelRegistry(persistence=FineTunedModels(store, files))
    engine = DiffusersEngine(settings, metrics, models)
    training = TrainingManager(t, defaults, metrics, models, store, files)
    server = GrpcServer(settings.server, [SERVICE_NAME], registry, errors)
    servicer = DiffusionServicer(engine, training, settings, metrics, errors)
    diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server(servicer, server.server)
    generate = (servicer.Generate, diffusion_pb2.GenerateRequest, diffusion_pb2.GenerateResponse)
    devices = settings.devices_per_worker  # a generation has its worker to itself
    server.server.add_generic_rpc_handlers(
        (settled_handlers("DiffusionService", {"Generate": generate}, errors, lambda: devices),)
    )
    await server.start()
    return DiffusionService(settings, server, engine, training, metrics)


def check_defaults(defaults: Defaults, settings: TrainingSettings) -> None:
    """The defaults file must fit the limits jobs are held to."""
    limits = settings.limits
    if defaults.max_train_steps > limits.max_train_steps:
        raise ValueError(
            f"the DreamBooth defaults' max_train_steps {defaults.max_train_steps} is over the "
            f"limit of {limits.max_train_steps}"
        )
    resolution = defaults.resolution
    if resolution is not None and not limits.min_resolution <= resolution <= limits.max_resolution:
        raise ValueError(
            f"the DreamBooth defaults' resolution {resolution} is outside "
            f"{limits.min_resolution} to {limits.max_resolution}"
        )
