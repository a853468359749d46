"""Test helpers for the gateway: a fake backend behind a real grpc.aio server,
and a gateway started against it. The fake is only for the proxy's own logic
(admission, slots, metering, pass-through); end-to-end tests use the real
vision service."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dreamsight_server import metering
from dreamsight_server.errors import ErrorTable, InvalidArgument
from dreamsight_server.interceptors import ErrorMappingInterceptor
from dreamsight_server.lanes import LaneServer
from dreamsight_server.lifecycle import ServerOptions
from dreamsight_server.metadata import TENANT_HEADER, gpu_seconds_trailer
from dreamsight_server.metering import settled_handlers
from gateway.config import GatewaySettings
from gateway.server import Gateway, start_gateway

ADMIN_TOKEN = "admin-token-for-tests"


@dataclass
class FakeVision(vision_pb2_grpc.VisionServiceServicer):
    """Chat behaviour chosen by the message text: ``sleep:S``, ``chunks:N``,
    ``big:N`` (64 KiB chunks), ``steps:N:MS`` (N deltas, one per MS milliseconds
    of a clock all calls share, as an engine's steps are), ``invalid``,
    ``slowstop:S`` (runs until stopped, then takes S seconds to stop), ``linger``
    (after its last message, its call ends only once ``linger`` is set). Every
    call reports ``gpu_seconds`` however it ends."""

    gpu_seconds: float = 0.5
    running: collections.Counter[str] = field(default_factory=collections.Counter)
    peak: collections.Counter[str] = field(default_factory=collections.Counter)
    tenants: list[str] = field(default_factory=list)
    deadlines: list[float | None] = field(default_factory=list)
    allowances: list[float | None] = field(default_factory=list)
    finished: int = 0
    produced: int = 0
    cancelled: int = 0
    linger: asyncio.Event = field(default_factory=asyncio.Event)

    async def Chat(
        self, request: vision_pb2.ChatRequest, context: Any
    ) -> AsyncIterator[vision_pb2.ChatResponse]:
        metadata = dict(context.invocation_metadata())
        tenant = metadata.get(TENANT_HEADER, "")
        self.tenants.append(tenant)
        self.deadlines.append(context.time_remaining())
        self.allowances.append(metering.allowance())
        text = request.messages[0].content if request.messages else ""
        if text == "invalid":
            raise InvalidArgument("messages[0].content", "the fake refuses this")
        self.running[tenant] += 1
        self.peak[tenant] = max(self.peak[tenant], self.running[tenant])
        try:
            if text.startswith("slowstop:"):  # runs until stopped, then takes S to stop
                await self._run_until_cancelled(float(text.split(":")[1]))
            sleep = float(text.split(":")[1]) if text.startswith("sleep:") else 0.0
            counted = text.startswith(("chunks:", "big:", "steps:"))
            chunks = int(text.split(":")[1]) if counted else 3
            step = float(text.split(":")[2]) / 1000 if text.startswith("steps:") else 0.0
            pad = "x" * 65536 if text.startswith("big:") else ""
            for i in range(chunks):
                self.produced += 1
                yield vision_pb2.ChatResponse(delta=f"t{i} {pad}")
                if sleep:
                    await asyncio.sleep(sleep / chunks)
                if step:  # to the clock's next tick, where every call's next delta is
                    await asyncio.sleep(step - asyncio.get_running_loop().time() % step)
            context.set_trailing_metadata(gpu_seconds_trailer(self.gpu_seconds))
            yield vision_pb2.ChatResponse(
                final=vision_pb2.ChatFinal(
                    finish_reason=vision_pb2.FINISH_REASON_STOP, completion_tokens=chunks
                )
            )
            if text == "linger":
                await self.linger.wait()
            self.finished += 1
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running[tenant] -= 1
            metering.report(self.gpu_seconds)  # what the fake "spent", however it ended

    async def _run_until_cancelled(self, stop_s: float) -> None:
        """Like a diffusion step in flight: a cancel takes stop_s to take effect."""
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(stop_s)
            raise

    async def ListModels(
        self, request: vision_pb2.ListModelsRequest, context: Any
    ) -> vision_pb2.ListModelsResponse:
        return vision_pb2.ListModelsResponse(models=[vision_pb2.VisionModel(name="fake")])

    async def GetModel(
        self, request: vision_pb2.GetModelRequest, context: Any
    ) -> vision_pb2.GetModelResponse:
        return vision_pb2.GetModelResponse(model=vision_pb2.VisionModel(name="fake"))


def serve_fake_vision(
    server: grpc.aio.Server, impl: FakeVision, lanes: bool = True, secret: str = ""
) -> LaneServer | None:
    """Add the fake's VisionService, the settled twin of its Chat and its lanes
    (the real wrappers, which are what the gateway calls), to a server; without
    lanes, it is a replica from before them."""
    vision_pb2_grpc.add_VisionServiceServicer_to_server(impl, server)
    chat = (impl.Chat, vision_pb2.ChatRequest, vision_pb2.ChatResponse)
    settled = settled_handlers("VisionService", {"Chat": chat}, ErrorTable(), lambda: 1.0)
    if not lanes:
        server.add_generic_rpc_handlers((settled,))
        return None
    lane_server = LaneServer("VisionService", {"Chat": chat}, ErrorTable(), lambda: 1.0, secret)
    server.add_generic_rpc_handlers((settled, lane_server.handler()))
    return lane_server


class FakeBackend:
    """A real grpc.aio server on loopback serving :class:`FakeVision`."""

    def __init__(
        self, impl: FakeVision, port: int = 0, lanes: bool = True, secret: str = ""
    ) -> None:
        """``secret``: its lanes are taken only with the gateway's token."""
        self.impl = impl
        self.port = port
        self.serves_lanes = lanes
        self.secret = secret
        self.server: grpc.aio.Server | None = None
        self.health: Any = None
        self.lanes: LaneServer | None = None

    async def start(self) -> int:
        server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
        self.lanes = serve_fake_vision(server, self.impl, self.serves_lanes, self.secret)
        servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health = servicer
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self.server = server
        return self.port

    async def kill(self) -> None:
        """Stop at once, failing in-flight calls (a crashed backend)."""
        if self.server is not None:
            await self.server.stop(0)
            self.server = None


async def gateway_for(
    tmp_path: Path,
    backend_port: int,
    *,
    database: str | None = None,
    tiers_file: str = "",
    redis_url: str = "",
    queue_length: int = 8,
    queue_wait_s: float = 5.0,
    lease_ttl_s: float = 15.0,
    metrics_port: int | None = 0,
    http_port: int | None = None,
    diffusion_port: int | None = None,
    lane_calls: int = 8,
    backend_secret: str = "",
    max_receive_bytes: int | None = None,
) -> Gateway:
    """A gateway on port 0 whose backends are the fake (HTTP off unless asked)."""
    options = ServerOptions(metrics_port=metrics_port, grace_s=1.0)
    if max_receive_bytes is not None:
        options = dataclasses.replace(options, max_receive_bytes=max_receive_bytes)
    settings = GatewaySettings(
        vision_target=f"127.0.0.1:{backend_port}",
        diffusion_target=f"127.0.0.1:{diffusion_port or backend_port}",
        tiers_file=tiers_file,
        database=database or str(tmp_path / "gateway.sqlite3"),
        redis_url=redis_url,
        admin_token=ADMIN_TOKEN,
        queue_length=queue_length,
        queue_wait_s=queue_wait_s,
        lease_ttl_s=lease_ttl_s,
        http_port=http_port,
        lane_calls=lane_calls,
        backend_secret=backend_secret,
        server=options,
    )
    return await start_gateway(settings)


@dataclass
class Stack:
    """A gateway in front of real services, and a key for calling it."""

    gateway: Gateway
    target: str
    key: str


async def new_key(gateway: Gateway, tenant: str, tier: str) -> str:
    """Mint a key directly through the core."""
    _, secret = await gateway.core.keys.create(tenant, tier, "test")
    return secret


async def no_slots_held(gateway: Gateway, tenant: str) -> None:
    """Until the tenant holds no slot (an HTTP reply, or a caller's cancel, returns
    before the backend's end is known and the call's bill counted, which frees
    its slot); fails after 5 s."""
    for _ in range(100):
        if await gateway.core.limiter.in_flight(tenant) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{tenant} still holds {await gateway.core.limiter.in_flight(tenant)}")


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    """Authorization metadata for a key."""
    return (("authorization", f"Bearer {secret}"),)


def chat_request(text: str) -> vision_pb2.ChatRequest:
    """A one-message chat request."""
    return vision_pb2.ChatRequest(
        messages=[vision_pb2.Message(role=vision_pb2.ROLE_USER, content=text)]
    )


async def collect(
    channel: grpc.aio.Channel, text: str, metadata: Any, timeout: float | None = None
) -> list[vision_pb2.ChatResponse]:
    """All messages of one Chat through the gateway."""
    stub = vision_pb2_grpc.VisionServiceStub(channel)
    return [r async for r in stub.Chat(chat_request(text), metadata=metadata, timeout=timeout)]
