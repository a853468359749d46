"""Lifecycle of the gateway: build the core, proxy, serve, drain, stop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from dreamsight.diffusion.v1 import diffusion_pb2
from dreamsight.gateway.v1 import admin_pb2, admin_pb2_grpc, usage_pb2, usage_pb2_grpc
from dreamsight.vision.v1 import vision_pb2
from prometheus_client import CollectorRegistry

from dreamsight_server.lifecycle import GrpcServer
from gateway.admission import Limiter, LocalLimiter, RedisLimiter
from gateway.budgets import Budgets
from gateway.config import GatewaySettings
from gateway.core import GatewayCore
from gateway.grpc_api.proxy import backend_channel, backend_credentials, proxies
from gateway.grpc_api.servicers import AdminServicer, UsageServicer
from gateway.http_api.server import HttpServer, start_http
from gateway.http_api.upstream import BodyLimits
from gateway.keys import KeyService
from gateway.lanes import LanePool, attach
from gateway.metrics import GatewayMetrics
from gateway.store import AsyncStore, SqlStore
from gateway.tiers import load_tiers
from gateway.training import TrainingMeter

log = logging.getLogger(__name__)

VISION = vision_pb2.DESCRIPTOR.services_by_name["VisionService"]
DIFFUSION = diffusion_pb2.DESCRIPTOR.services_by_name["DiffusionService"]
USAGE = usage_pb2.DESCRIPTOR.services_by_name["UsageService"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]


@dataclass
class Gateway:
    """A running gateway."""

    settings: GatewaySettings
    server: GrpcServer
    core: GatewayCore
    store: AsyncStore
    channels: list[grpc.aio.Channel]
    http: HttpServer | None = None
    """The Ollama/OpenAI HTTP front end, unless settings.http_port is None."""
    sweeper: asyncio.Task[None] | None = None
    """Bills DreamBooth jobs that ended, whoever watches (TrainingMeter.sweep_forever)."""

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.server.port

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port, or None when HTTP is off."""
        return self.http.port if self.http else None

    async def load(self) -> None:
        """Nothing to load: the gateway serves once started (lifecycle.serve calls this)."""

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, drain within the grace period, close backends and the store."""
        grace = self.settings.server.grace_s if grace_s is None else grace_s
        if self.sweeper is not None:  # the next gateway's sweeper goes on from the store
            self.sweeper.cancel()
            await asyncio.gather(self.sweeper, return_exceptions=True)
        stopping = [self.server.stop(grace)]
        if self.http is not None:
            stopping.append(self.http.stop(grace))
        await asyncio.gather(*stopping)
        # Calls cut by the stop are still learning what they spent: bill them first.
        await self.core.drain(self.settings.settle_timeout_s)
        for channel in self.channels:
            await channel.close(grace=None)
        await self.core.limiter.close()
        await self.store.aclose()


def build_limiter(settings: GatewaySettings) -> Limiter:
    """Redis leases when a URL is configured, else this process's counters."""
    if settings.redis_url:
        return RedisLimiter(
            settings.redis_url, settings.queue_length, settings.queue_wait_s, settings.lease_ttl_s
        )
    return LocalLimiter(settings.queue_length, settings.queue_wait_s)


async def start_gateway(
    settings: GatewaySettings, registry: CollectorRegistry | None = None
) -> Gateway:
    """Build everything and start serving."""
    registry = registry or CollectorRegistry()
    tiers = load_tiers(settings.tiers_file)
    store = AsyncStore(SqlStore(settings.database))
    metrics = GatewayMetrics(registry)
    core = GatewayCore(
        keys=KeyService(store, set(tiers), settings.key_cache_ttl_s),
        tiers=tiers,
        budgets=Budgets(store, settings.budget_cache_ttl_s),
        limiter=build_limiter(settings),
        metrics=metrics,
        backend_secret=settings.backend_secret,
        settle_timeout_s=settings.settle_timeout_s,
    )
    max_bytes = settings.server.max_receive_bytes
    credentials = backend_credentials(
        settings.backend_tls_ca, settings.backend_tls_cert, settings.backend_tls_key
    )
    name = settings.backend_tls_server_name
    vision = backend_channel(settings.vision_target, max_bytes, credentials, name)
    diffusion = backend_channel(settings.diffusion_target, max_bytes, credentials, name)
    if settings.lane_calls > 0:
        pool = LanePool(vision, settings.lane_calls, ["VisionService.Chat"], core.gateway_token())
        attach(vision, pool)
    training = TrainingMeter(core, diffusion, store)
    names = [d.full_name for d in (VISION, DIFFUSION, USAGE, ADMIN)]
    server = GrpcServer(settings.server, names, registry)
    server.server.add_generic_rpc_handlers(
        proxies(core, [(VISION, vision, None), (DIFFUSION, diffusion, training)])
    )
    usage_pb2_grpc.add_UsageServiceServicer_to_server(UsageServicer(core, training), server.server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(core, settings.admin_token), server.server
    )
    await server.start()
    gateway = Gateway(settings, server, core, store, [vision, diffusion])
    if settings.http_port is not None:
        try:
            gateway.http = await start_http(
                core,
                vision,
                diffusion,
                settings.server.host,
                settings.http_port,
                BodyLimits(settings.http_chat_body_bytes, settings.http_body_bytes),
                settings.server.tls,
                public_models=settings.http_public_models,
            )
        except BaseException:  # e.g. the port is taken: leave nothing running
            await gateway.stop(0)
            raise
    gateway.sweeper = asyncio.create_task(training.sweep_forever(settings.job_sweep_s))
    await server.set_serving(True)
    return gateway
