"""Through the gateway to the real vision service (vLLM, tiny demo LLaVA)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc

from gateway.server import Gateway
from tests.conftest import VisionHandle
from tests.gateway_helpers import bearer, gateway_for, new_key, no_slots_held
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
    await no_slots_held(gateway, "quitter")  # the slot follows the bill


async def _ledger_row(gateway: Gateway, tenant: str) -> float:
    for _ in range(300):
        entries = gateway.store.sync.usage_entries(tenant, 0)
        if entries:
            (entry,) = entries
            assert not entry.estimated
            return entry.gpu_seconds
        await asyncio.sleep(0.02)
    raise AssertionError(f"{tenant} was never billed")


async def test_a_chat_cancelled_mid_stream_is_billed_what_vllm_spent(
    gateway: Gateway, vision: VisionHandle
) -> None:
    key = await new_key(gateway, "canceller", "pro")
    spent_before = vision.service.metrics.gpu_seconds._value.get()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        request = vision_pb2.ChatRequest(
            messages=[user("Tell a long story.", png("green"))],
            options=vision_pb2.ChatOptions(temperature=1.0, seed=6, max_tokens=900),
        )
        call = stub.Chat(request, metadata=bearer(key))
        async for response in call:
            if response.WhichOneof("event") == "delta":
                break
        call.cancel()
    billed = await _ledger_row(gateway, "canceller")
    spent = vision.service.metrics.gpu_seconds._value.get() - spent_before
    assert billed > 0 and billed == pytest.approx(spent, rel=0.01)


async def test_a_generation_cancelled_mid_step_is_billed_after_the_step_ends(
    tmp_path: Path, diffusion_backend: Any
) -> None:
    """The slot comes back only once the worker let go, and the bill covers the
    step that was in flight when the cancel arrived."""
    engine = diffusion_backend.engine
    gw = await gateway_for(tmp_path, diffusion_backend.port, diffusion_port=diffusion_backend.port)
    try:
        key = await new_key(gw, "impatient", "pro")
        busy_before = engine.meter.busy_seconds
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            request = diffusion_pb2.GenerateRequest(prompt="a long one", steps=150, seed=3)
            call = stub.Generate(request, metadata=bearer(key))
            async for response in call:
                if response.progress.step == 2:
                    break
            call.cancel()
            while await gw.core.limiter.in_flight("impatient"):
                await asyncio.sleep(0.005)
            assert engine.running == 0, "the slot came back before the worker stopped"
        billed = await _ledger_row(gw, "impatient")
        assert billed > 0 and billed == pytest.approx(engine.meter.busy_seconds - busy_before)
        assert engine.recent[-1].outcome == "cancelled"
    finally:
        await gw.stop(0)


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


async def test_one_long_chat_cannot_spend_far_past_the_window(
    tmp_path: Path, vision: VisionHandle
) -> None:
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text("tiers:\n  sip: {concurrent_requests: 1, windows: {5h: 0.05, 7d: 100}}\n")
    gw = await gateway_for(tmp_path, vision.service.port, tiers_file=str(tiers))
    try:
        key = await new_key(gw, "greedy", "sip")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            request = vision_pb2.ChatRequest(
                messages=[user("Tell a long story.", png("red"))],
                options=vision_pb2.ChatOptions(temperature=1.0, seed=7, max_tokens=900),
            )
            final = [r async for r in stub.Chat(request, metadata=bearer(key))][-1].final
        assert final.finish_reason == vision_pb2.FINISH_REASON_GPU_BUDGET
        assert final.completion_tokens < 900
        billed = await _ledger_row(gw, "greedy")
        assert 0.05 <= billed < 0.05 + 0.25, "stopped within a few decode steps of the budget"
    finally:
        await gw.stop(0)


async def test_one_long_generation_stops_at_its_allowance(
    tmp_path: Path, diffusion_backend: Any
) -> None:
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text("tiers:\n  sip: {concurrent_requests: 1, windows: {5h: 0.2, 7d: 100}}\n")
    port = diffusion_backend.port
    gw = await gateway_for(tmp_path, port, diffusion_port=port, tiers_file=str(tiers))
    try:
        key = await new_key(gw, "greedy-images", "sip")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            request = diffusion_pb2.GenerateRequest(prompt="a long one", steps=150, seed=4)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.Generate(request, metadata=bearer(key)):
                    pass
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "allowance" in (caught.value.details() or "")
        billed = await _ledger_row(gw, "greedy-images")
        step = max(diffusion_backend.engine.recent[-1].steps_done, 1)
        assert 0.2 <= billed <= 0.2 + 2 * billed / step, "at most about one step past it"
    finally:
        await gw.stop(0)
