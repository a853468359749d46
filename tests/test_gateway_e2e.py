"""Through the gateway to the real vision service (vLLM, tiny demo LLaVA)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc

from gateway.server import Gateway
from tests.conftest import VisionHandle
from tests.gateway_helpers import bearer, gateway_for, new_key
from tests.test_vision_service import png, user

pytestmark = pytest.mark.slow


@pytest.fixture
async def gateway(tmp_path: Path, vision: VisionHandle) -> AsyncIterator[Gateway]:
    gw = await gateway_for(tmp_path, vision.service.port)
    yield gw
    await gw.stop(0)


async def test_chat_through_the_gateway_is_billed_what_the_backend_reported(
    gateway: Gateway, vision: VisionHandle
) -> None:
    key = await new_key(gateway, "e2e", "pro")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        request = vision_pb2.ChatRequest(
            model="llava-demo",
            messages=[user("What is this?", png("red"))],
            options=vision_pb2.ChatOptions(temperature=0.0, max_tokens=8),
        )
        responses = [r async for r in stub.Chat(request, metadata=bearer(key))]
        direct = vision_pb2_grpc.VisionServiceStub(vision.channel)
        same = [r async for r in direct.Chat(request)]
    final = responses[-1].final
    assert final.completion_tokens >= 1 and final.usage.gpu_seconds > 0
    assert final.text == same[-1].final.text, "the gateway changes nothing"
    rows, total = gateway.store.sync.total_usage()
    assert rows == 1 and total == pytest.approx(final.usage.gpu_seconds)


async def test_cancel_through_the_gateway_aborts_the_engine(
    gateway: Gateway, vision: VisionHandle
) -> None:
    key = await new_key(gateway, "quitter", "pro")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        request = vision_pb2.ChatRequest(
            messages=[user("Tell a long story.", png("blue"))],
            options=vision_pb2.ChatOptions(temperature=1.0, seed=5, max_tokens=900),
        )
        call = stub.Chat(request, metadata=bearer(key))
        async for response in call:
            if response.WhichOneof("event") == "delta":
                break
        assert vision.service.engine.num_unfinished() == 1
        call.cancel()
    for _ in range(100):
        if vision.service.engine.num_unfinished() == 0:
            break
        await asyncio.sleep(0.05)
    assert vision.service.engine.num_unfinished() == 0
    assert await gateway.core.limiter.in_flight("quitter") == 0


async def test_invalid_image_error_reaches_the_caller_unchanged(gateway: Gateway) -> None:
    key = await new_key(gateway, "sloppy", "free")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        request = vision_pb2.ChatRequest(messages=[user("hi", b"garbage")])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Chat(request, metadata=bearer(key)):
                pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("messages[0].images[0]:")
    assert await gateway.core.limiter.in_flight("sloppy") == 0
