"""Every ending of a metered call is billed, and the slot comes back only when
the backend's work has stopped (gateway.calls, dreamsight_server.metering).

The backend here is the fake behind a real gRPC server and the real settled
wrapper: what is under test is the transport between gateway and backend.
The real services' side (the diffusion step in flight, vLLM's abort) is in
tests/test_gateway_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from dreamsight.vision.v1 import vision_pb2_grpc

from gateway.server import Gateway
from tests.gateway_helpers import (
    FakeBackend,
    FakeVision,
    bearer,
    chat_request,
    collect,
    gateway_for,
    new_key,
    no_slots_held,
)


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    fake = FakeBackend(FakeVision(gpu_seconds=0.25))
    await fake.start()
    yield fake
    await fake.kill()


@pytest.fixture(params=[8, 0], ids=["lanes", "own-streams"])
async def gateway(
    tmp_path: Path, backend: FakeBackend, request: pytest.FixtureRequest
) -> AsyncIterator[Gateway]:
    """Both transports to the backend: chats on shared lanes, and each on its own stream."""
    gw = await gateway_for(
        tmp_path,
        backend.port,
        queue_length=40,
        queue_wait_s=20,
        http_port=0,
        lane_calls=request.param,
    )
    yield gw
    await gw.stop(0)


@pytest.fixture
async def channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        yield ch


async def _ledger(gateway: Gateway, tenant: str, rows: int) -> list[float]:
    """The tenant's billed GPU-seconds, once the ledger has rows (billing ends after the reply)."""
    for _ in range(200):
        entries = gateway.store.sync.usage_entries(tenant, 0)
        if len(entries) >= rows:
            return [e.gpu_seconds for e in entries]
        await asyncio.sleep(0.02)
    raise AssertionError(f"{tenant}: {len(entries)} ledger rows, expected {rows}")


async def test_cancels_and_deadlines_on_grpc_are_billed_what_the_backend_spent(
    gateway: Gateway, backend: FakeBackend, channel: grpc.aio.Channel
) -> None:
    key = await new_key(gateway, "quitter", "max")
    stub = vision_pb2_grpc.VisionServiceStub(channel)

    async def cancel_after_first() -> None:
        call = stub.Chat(chat_request("sleep:2"), metadata=bearer(key))
        async for _ in call:
            call.cancel()
            break

    async def deadline() -> None:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(channel, "sleep:2", bearer(key), timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    await asyncio.gather(*(cancel_after_first() for _ in range(5)), *(deadline() for _ in range(5)))
    billed = await _ledger(gateway, "quitter", 10)
    assert billed == pytest.approx([0.25] * 10), "every ending billed what the backend reported"
    assert backend.impl.cancelled == 10


async def test_http_disconnects_and_deadlines_are_billed(
    gateway: Gateway, backend: FakeBackend
) -> None:
    key = await new_key(gateway, "leaver", "max")
    url = f"http://127.0.0.1:{gateway.http_port}/v1/chat/completions"
    body = {"model": "fake", "messages": [{"role": "user", "content": "sleep:3"}], "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers=headers) as response:
            assert response.status == 200
            await response.content.readline()  # the first event arrived; now hang up
        timed = {**headers, "X-Request-Timeout": "0.3"}
        async with session.post(url, json={**body, "stream": False}, headers=timed) as response:
            assert response.status == 504
    assert await _ledger(gateway, "leaver", 2) == pytest.approx([0.25, 0.25])


async def test_a_stream_ends_for_its_client_at_the_last_message_and_is_billed_after(
    gateway: Gateway, backend: FakeBackend
) -> None:
    """Both HTTP APIs end a streamed reply when the backend's last message comes,
    not when the backend's call ends (its trailer, which takes a while on a busy
    backend); the bill and the slot still wait for the backend's own account."""
    key = await new_key(gateway, "prompt", "max")
    headers = {"Authorization": f"Bearer {key}"}
    message = [{"role": "user", "content": "linger"}]
    base = f"http://127.0.0.1:{gateway.http_port}"
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/v1/chat/completions",
            json={"model": "fake", "messages": message, "stream": True},
            headers=headers,
        ) as response:
            events = await asyncio.wait_for(response.text(), 10)
        assert events.endswith("data: [DONE]\n\n")
        async with session.post(
            f"{base}/api/chat", json={"model": "fake", "messages": message}, headers=headers
        ) as response:
            lines = (await asyncio.wait_for(response.text(), 10)).splitlines()
        assert json.loads(lines[-1])["done"] is True
    assert backend.impl.running["prompt"] == 2, "both backend calls still running"
    assert gateway.store.sync.usage_entries("prompt", 0) == [], "nothing billed before they end"
    assert await gateway.core.limiter.in_flight("prompt") == 2, "their slots still held"
    backend.impl.linger.set()
    assert await _ledger(gateway, "prompt", 2) == pytest.approx([0.25, 0.25])
    assert not any(e.estimated for e in gateway.store.sync.usage_entries("prompt", 0))
    await no_slots_held(gateway, "prompt")
    for protocol in ("openai", "ollama"):
        labels = {"service": "VisionService", "method": "Chat", "code": "OK", "tier": "max"}
        value = gateway.core.metrics.registry.get_sample_value(
            "dreamsight_gateway_requests_total", {**labels, "protocol": protocol}
        )
        assert value == 1, f"{protocol}: the call ended OK, not stopped"


async def test_the_slot_returns_only_when_the_backend_stopped(
    gateway: Gateway, backend: FakeBackend, channel: grpc.aio.Channel
) -> None:
    """A free tenant cancels a call whose backend takes 0.5 s to stop, and calls
    again at once: the backend never runs two of its calls."""
    key = await new_key(gateway, "hasty", "free")
    stub = vision_pb2_grpc.VisionServiceStub(channel)
    first = stub.Chat(chat_request("slowstop:0.5"), metadata=bearer(key))
    while backend.impl.running["hasty"] == 0:
        await asyncio.sleep(0.01)
    first.cancel()
    started = time.monotonic()
    replies = await collect(channel, "hi", bearer(key))
    assert replies[-1].HasField("final")
    assert backend.impl.peak["hasty"] == 1, "the tier held at the backend too"
    assert time.monotonic() - started >= 0.45, "the second call waited for the first to stop"
    assert await _ledger(gateway, "hasty", 2) == pytest.approx([0.25, 0.25])


async def test_a_backend_that_dies_mid_call_is_billed_a_marked_estimate(
    gateway: Gateway, backend: FakeBackend, channel: grpc.aio.Channel
) -> None:
    key = await new_key(gateway, "unlucky", "pro")
    started = time.monotonic()
    doomed = asyncio.ensure_future(collect(channel, "sleep:5", bearer(key)))
    while backend.impl.running["unlucky"] == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    await backend.kill()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await doomed
    elapsed = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await _ledger(gateway, "unlucky", 1)
    (entry,) = gateway.store.sync.usage_entries("unlucky", 0)
    assert entry.estimated, "marked as an estimate"
    assert 0.25 <= entry.gpu_seconds <= elapsed, "elapsed time x the device share (1 here)"
    await no_slots_held(gateway, "unlucky")  # the slot follows the bill


async def test_allowances_of_calls_in_flight_never_exceed_the_budget_left(
    tmp_path: Path, backend: FakeBackend
) -> None:
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text("tiers:\n  small: {concurrent_requests: 3, windows: {5h: 0.6, 7d: 100}}\n")
    gw = await gateway_for(tmp_path, backend.port, tiers_file=str(tiers))
    try:
        key = await new_key(gw, "frugal", "small")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            await asyncio.gather(*(collect(ch, "sleep:0.5", bearer(key)) for _ in range(3)))
            first = backend.impl.allowances[-3:]
            assert all(a is not None and a > 0 for a in first)
            assert sum(a or 0 for a in first) == pytest.approx(0.6), "the budget, shared out"
            # 0.75 billed: the window is spent, and the next call is refused at admission.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(ch, "hi", bearer(key))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await gw.core.limiter.in_flight("frugal") == 0
    finally:
        await gw.stop(0)


async def test_a_queued_calls_allowance_sees_what_the_call_before_it_spent(
    tmp_path: Path, backend: FakeBackend
) -> None:
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text("tiers:\n  one: {concurrent_requests: 1, windows: {5h: 0.4, 7d: 100}}\n")
    gw = await gateway_for(tmp_path, backend.port, tiers_file=str(tiers))
    try:
        key = await new_key(gw, "queuer", "one")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            first = asyncio.ensure_future(collect(ch, "sleep:0.3", bearer(key)))
            while backend.impl.running["queuer"] == 0:
                await asyncio.sleep(0.01)
            await collect(ch, "hi", bearer(key))  # queued behind the first
            await first
        first_allowance, second_allowance = backend.impl.allowances[-2:]
        assert first_allowance == pytest.approx(0.4)
        assert second_allowance == pytest.approx(0.4 - 0.25), "the first call's bill counted"
    finally:
        await gw.stop(0)


async def test_a_stopping_gateway_bills_the_calls_it_cuts(
    tmp_path: Path, backend: FakeBackend
) -> None:
    from gateway.store import SqlStore

    gw = await gateway_for(tmp_path, backend.port)
    key = await new_key(gw, "cut", "pro")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}")
    calls = [asyncio.ensure_future(collect(channel, "slowstop:0.3", bearer(key))) for _ in range(3)]
    while backend.impl.running["cut"] < 3:
        await asyncio.sleep(0.01)
    await gw.stop(0)  # cuts the three calls; each backend call takes 0.3 s to stop
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError):
            await call
    await channel.close(None)
    store = SqlStore(str(tmp_path / "gateway.sqlite3"))
    try:
        assert [e.gpu_seconds for e in store.usage_entries("cut", 0)] == pytest.approx([0.25] * 3)
    finally:
        store.close()


async def test_a_settled_call_runs_in_its_callers_task_and_a_stop_ends_it_there() -> None:
    """The behaviour runs in the task that serves the call (a task of its own
    waits a turn of the busy event loop to start: docs/benchmarks.md, twelfth
    round); the gateway's stop cancels it there, and the call still settles:
    stopped, with what it wrote, the caller's task not left cancelled."""
    from dreamsight_server.lanes import LaneCallContext
    from dreamsight_server.metering import run_settled

    tasks: list[asyncio.Task[object] | None] = []
    written: list[str] = []

    async def behavior(request: object, context: object) -> AsyncIterator[str]:
        tasks.append(asyncio.current_task())
        yield "first"
        await asyncio.sleep(30)
        yield "never"

    async def write(message: str) -> None:
        written.append(message)

    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    context: object = LaneCallContext([], None)
    call = asyncio.ensure_future(run_settled(behavior, None, context, write, stop, "T/M"))  # type: ignore[arg-type]
    while not written:
        await asyncio.sleep(0.01)
    stop.set_result(None)
    settled = await asyncio.wait_for(call, 5)
    assert tasks == [call]
    assert settled.stopped and settled.error is None and written == ["first"]
    assert not call.cancelled()


async def _settle(behavior: Any, stop: asyncio.Future[None]) -> tuple[Any, int]:
    """run_settled in this task: its settlement, and the cancellations still
    asked of this task after it."""
    from dreamsight_server.lanes import LaneCallContext
    from dreamsight_server.metering import run_settled

    async def write(message: object) -> None:
        pass

    context: Any = LaneCallContext([], None)
    settled = await run_settled(behavior, None, context, write, stop, "T/M")
    task = asyncio.current_task()
    assert task is not None
    return settled, task.cancelling()


async def _swallows_cancels(request: object, context: object) -> AsyncIterator[str]:
    """A behaviour that writes once, then catches the cancellation of its wait
    and returns."""
    yield "first"
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(30)


async def test_a_settled_call_cancelled_from_outside_as_it_is_stopped_stays_cancelled() -> None:
    """The gateway's stop and the caller's own cancellation (the gateway went
    away) together: the serving task ends cancelled, as it would without the
    stop, not settled as if only stopped."""
    cleaned: list[bool] = []

    async def behavior(request: object, context: object) -> AsyncIterator[str]:
        try:
            yield "first"
            await asyncio.sleep(30)
        finally:
            cleaned.append(True)

    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(_settle(behavior, stop))
    await asyncio.sleep(0.05)
    stop.set_result(None)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert cleaned == [True]


async def test_a_behaviour_cancelled_by_what_it_awaited_settles_stopped() -> None:
    """Something the behaviour awaited was cancelled (not the call): it ends
    stopped and settles, so its end still reaches the gateway."""
    awaited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def behavior(request: object, context: object) -> AsyncIterator[str]:
        yield "first"
        await awaited

    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(_settle(behavior, stop))
    await asyncio.sleep(0.05)
    awaited.cancel()
    settled, cancelling = await asyncio.wait_for(call, 5)
    assert settled.stopped and settled.error is None and cancelling == 0


async def test_a_behaviour_that_swallows_the_stop_ends_by_itself_and_leaves_no_cancel() -> None:
    """A behaviour that catches the stop's cancellation and returns ended by
    itself (not stopped), and the serving task is left with no cancellation
    asked of it."""

    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(_settle(_swallows_cancels, stop))
    await asyncio.sleep(0.05)
    stop.set_result(None)
    settled, cancelling = await asyncio.wait_for(call, 5)
    assert not settled.stopped and settled.error is None and cancelling == 0


async def test_a_stop_during_the_behaviours_own_timeout_still_stops_it() -> None:
    """The gateway's stop arrives while a timeout inside the behaviour is
    cancelling it (its cleanup awaiting): the call ends stopped, its fallback
    never runs."""
    written: list[str] = []

    async def behavior(request: object, context: object) -> AsyncIterator[str]:
        yield "first"
        try:
            async with asyncio.timeout(0.01):
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    await asyncio.sleep(0.3)  # cleanup, the timeout's cancel in flight
                    raise
        except TimeoutError:
            yield "fallback"

    async def record(message: str) -> None:
        written.append(message)

    from dreamsight_server.lanes import LaneCallContext
    from dreamsight_server.metering import run_settled

    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    context: Any = LaneCallContext([], None)
    call = asyncio.ensure_future(run_settled(behavior, None, context, record, stop, "T/M"))
    await asyncio.sleep(0.15)
    stop.set_result(None)
    settled = await asyncio.wait_for(call, 5)
    assert settled.stopped and written == ["first"]


async def test_an_outside_cancel_the_behaviour_swallows_still_ends_the_call_cancelled() -> None:
    """The caller's own cancellation (the gateway went away), caught and ignored
    by the behaviour: the serving task still ends cancelled, as it did when the
    behaviour ran in a task of its own."""

    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(_settle(_swallows_cancels, stop))
    await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
