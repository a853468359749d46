"""The gateway's own logic over real gRPC: auth, tiers, slots, metering, proxy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from dreamsight.gateway.v1 import admin_pb2, admin_pb2_grpc, usage_pb2, usage_pb2_grpc
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.server import Gateway
from tests.gateway_helpers import (
    ADMIN_TOKEN,
    FakeBackend,
    FakeVision,
    bearer,
    collect,
    gateway_for,
    new_key,
    no_slots_held,
)
from tests.metrics_scrape import metrics_text
from tests.test_ledger_groups import blocked_writes


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    fake = FakeBackend(FakeVision())
    await fake.start()
    yield fake
    await fake.kill()


@pytest.fixture
async def gateway(tmp_path: Path, backend: FakeBackend) -> AsyncIterator[Gateway]:
    gw = await gateway_for(tmp_path, backend.port, queue_length=40, queue_wait_s=20)
    yield gw
    await gw.stop(0)


@pytest.fixture
async def channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        yield ch


def _details(error: grpc.aio.AioRpcError) -> list[Any]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    return list(status.details) if status else []


@pytest.mark.parametrize(("tier", "limit"), [("free", 1), ("pro", 3)])
async def test_tier_holds_exactly_under_a_storm(
    gateway: Gateway, backend: FakeBackend, channel: grpc.aio.Channel, tier: str, limit: int
) -> None:
    key = await new_key(gateway, f"storm-{tier}", tier)
    results = await asyncio.gather(
        *(collect(channel, "sleep:0.05", bearer(key)) for _ in range(30))
    )
    assert all(r[-1].WhichOneof("event") == "final" for r in results)
    assert backend.impl.peak[f"storm-{tier}"] == limit
    await no_slots_held(gateway, f"storm-{tier}")


async def test_queue_full_is_resource_exhausted_with_retry_and_quota(
    tmp_path: Path, backend: FakeBackend
) -> None:
    gw = await gateway_for(tmp_path, backend.port, queue_length=1, queue_wait_s=5)
    try:
        key = await new_key(gw, "busy", "free")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            calls = [asyncio.ensure_future(collect(ch, "sleep:0.6", bearer(key))) for _ in range(3)]
            done = await asyncio.gather(*calls, return_exceptions=True)
        errors = [d for d in done if isinstance(d, grpc.aio.AioRpcError)]
        assert len(errors) == 1, done  # one running, one queued, one refused
        error = errors[0]
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = _details(error)
        retry, quota = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
        assert any(d.Unpack(retry) for d in details) and retry.retry_delay.seconds >= 1
        assert any(d.Unpack(quota) for d in details)
        assert quota.violations[0].subject == "tenant:busy"
        await no_slots_held(gw, "busy")
    finally:
        await gw.stop(0)


async def test_queue_wait_runs_out(tmp_path: Path, backend: FakeBackend) -> None:
    gw = await gateway_for(tmp_path, backend.port, queue_length=4, queue_wait_s=0.2)
    try:
        key = await new_key(gw, "slow", "free")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            first = asyncio.ensure_future(collect(ch, "sleep:1.0", bearer(key)))
            await asyncio.sleep(0.1)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(ch, "quick", bearer(key))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "waited too long" in (caught.value.details() or "")
            await first
        await no_slots_held(gw, "slow")
    finally:
        await gw.stop(0)


async def test_no_slot_leaks_after_cancels_deadlines_and_a_killed_backend(
    gateway: Gateway, backend: FakeBackend, channel: grpc.aio.Channel
) -> None:
    key = await new_key(gateway, "leaky", "max")
    stub = vision_pb2_grpc.VisionServiceStub(channel)
    from tests.gateway_helpers import chat_request

    async def cancel_after_first() -> None:
        call = stub.Chat(chat_request("sleep:2"), metadata=bearer(key))
        async for _ in call:
            call.cancel()
            break

    async def deadline() -> None:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(channel, "sleep:2", bearer(key), timeout=0.05)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    for batch in range(10):
        await asyncio.gather(*(cancel_after_first() for _ in range(10)))
        await asyncio.gather(*(deadline() for _ in range(9)))
        # One call per batch dies with its backend.
        doomed = asyncio.ensure_future(collect(channel, "sleep:2", bearer(key)))
        await asyncio.sleep(0.1)
        await backend.kill()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await doomed
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, batch
        await backend.start()
        await _until_served(channel, bearer(key))
    await no_slots_held(gateway, "leaky")
    assert gateway.core.metrics.in_flight.labels("max")._value.get() == 0
    assert backend.impl.running["leaky"] == 0, "the backend computes for nobody"


async def _until_served(channel: grpc.aio.Channel, metadata: Any) -> None:
    """Wait for a restarted backend to serve through the gateway again."""
    for _ in range(100):
        try:
            if (await collect(channel, "ok", metadata))[-1].HasField("final"):
                return
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.05)
    raise AssertionError("the backend never came back")


async def test_auth_errors_look_the_same(gateway: Gateway, channel: grpc.aio.Channel) -> None:
    key = await new_key(gateway, "acme", "pro")
    revoked = await new_key(gateway, "acme", "pro")
    revoked_id = revoked.split("_")[1]
    await gateway.core.keys.revoke(revoked_id)
    unknown = "ds_0123456789ab_" + "x" * 32
    messages = {}
    for name, metadata in (
        ("none", ()),
        ("unknown", bearer(unknown)),
        ("revoked", bearer(revoked)),
        ("other scheme", (("authorization", "Basic abc"),)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(channel, "hi", metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        messages[name] = caught.value.details()
    # Saying that no key came reveals nothing; unknown and revoked keys look alike.
    assert messages["unknown"] == messages["revoked"]
    assert messages["none"] == messages["other scheme"] != messages["unknown"]
    assert (await collect(channel, "hi", bearer(key)))[-1].HasField("final")


async def test_tenant_metadata_spoofing_is_stripped(
    gateway: Gateway, backend: FakeBackend, channel: grpc.aio.Channel
) -> None:
    key = await new_key(gateway, "honest", "pro")
    spoof = (
        *bearer(key),
        ("x-dreamsight-tenant", "victim"),
        ("x-dreamsight-gateway-token", "guess"),
    )
    await collect(channel, "hi", spoof)
    assert backend.impl.tenants[-1] == "honest"


async def test_deadline_propagates_upstream(
    gateway: Gateway, backend: FakeBackend, channel: grpc.aio.Channel
) -> None:
    key = await new_key(gateway, "timed", "pro")
    await collect(channel, "hi", bearer(key), timeout=30)
    remaining = backend.impl.deadlines[-1]
    # The backend may outlive the caller's deadline by the settle timeout: the
    # gateway stops the call itself at the deadline and waits for its report.
    settle = gateway.settings.settle_timeout_s
    assert remaining is not None and 20 + settle < remaining <= 31 + settle


async def test_backend_status_and_details_pass_through(
    gateway: Gateway, channel: grpc.aio.Channel
) -> None:
    key = await new_key(gateway, "bad", "pro")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(channel, "invalid", bearer(key))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "messages[0].content: the fake refuses this"
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in _details(caught.value))
    assert bad.field_violations[0].field == "messages[0].content"
    await no_slots_held(gateway, "bad")


async def test_unary_calls_pass_through(gateway: Gateway, channel: grpc.aio.Channel) -> None:
    key = await new_key(gateway, "lister", "free")
    stub = vision_pb2_grpc.VisionServiceStub(channel)
    listed = await stub.ListModels(vision_pb2.ListModelsRequest(), metadata=bearer(key))
    assert [m.name for m in listed.models] == ["fake"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListModels(vision_pb2.ListModelsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_repeated_request_id_is_billed_for_every_call(
    gateway: Gateway, channel: grpc.aio.Channel
) -> None:
    """The ledger keys on the gateway's own call id: sending the same
    x-request-id every time (once a way to be billed once for everything)
    bills every call, and the caller's id is kept for tracing."""
    key = await new_key(gateway, "retry", "pro")
    rows_before, total_before = gateway.store.sync.total_usage()
    metadata = (*bearer(key), ("x-request-id", "req-1"))
    for _ in range(3):
        await collect(channel, "hi", metadata)
    await collect(channel, "hi", (*bearer(key), ("x-request-id", "req-2")))
    rows, total = gateway.store.sync.total_usage()
    assert rows - rows_before == 4 and total - total_before == pytest.approx(2.0)
    entries = gateway.store.sync.usage_entries("retry", 0)
    assert sorted(e.request_id for e in entries) == ["req-1", "req-1", "req-1", "req-2"]
    assert len({e.ledger_id for e in entries}) == 4


async def test_budget_window_refuses_at_once_and_ledger_survives_restart(
    tmp_path: Path, backend: FakeBackend
) -> None:
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text("tiers:\n  tiny: {concurrent_requests: 2, windows: {5h: 1.0, 7d: 100}}\n")
    database = str(tmp_path / "ledger.sqlite3")
    gw = await gateway_for(tmp_path, backend.port, database=database, tiers_file=str(tiers))
    key = await new_key(gw, "thrifty", "tiny")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        await collect(ch, "hi", bearer(key))  # 0.5
        await collect(ch, "hi", bearer(key))  # 1.0: spent
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(ch, "hi", bearer(key))
    await gw.stop(0)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "5h window" in (caught.value.details() or "")
    assert "resets at" in (caught.value.details() or "")
    quota = error_details_pb2.QuotaFailure()
    assert any(d.Unpack(quota) for d in _details(caught.value))

    restarted = await gateway_for(tmp_path, backend.port, database=database, tiers_file=str(tiers))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.port}") as ch:
            usage = await usage_pb2_grpc.UsageServiceStub(ch).GetUsage(
                usage_pb2.GetUsageRequest(), metadata=bearer(key)
            )
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await collect(ch, "hi", bearer(key))
        assert again.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert usage.tier == "tiny" and usage.max_concurrent_requests == 2
        five_hours = next(w for w in usage.windows if w.name == "5h")
        assert five_hours.used_gpu_seconds == pytest.approx(1.0)
        assert five_hours.limit_gpu_seconds == 1.0
        assert five_hours.reset_time.seconds > 0
    finally:
        await restarted.stop(0)


async def test_a_slow_ledger_holds_no_slot_and_its_bills_still_count(
    tmp_path: Path, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slot comes back once the bill counts, not once its ledger row is
    written: a busy store held the slots of calls long over, and a tenant with
    16 requests open was refused at a limit of 64."""
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text("tiers:\n  one: {concurrent_requests: 1, windows: {5h: 1.0}}\n")
    gw = await gateway_for(tmp_path, backend.port, tiers_file=str(tiers), queue_length=0)
    entered, release = blocked_writes(gw.store, monkeypatch)
    try:
        key = await new_key(gw, "steady", "one")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            calls = [asyncio.ensure_future(collect(ch, "hi", bearer(key)))]  # 0.5 GPU-s
            await asyncio.to_thread(entered.wait, 30)  # its row is being written, slowly
            await no_slots_held(gw, "steady")
            calls.append(asyncio.ensure_future(collect(ch, "hi", bearer(key))))  # no queue
            while backend.impl.finished < 2:
                await asyncio.sleep(0.01)
            await no_slots_held(gw, "steady")
            assert not any(c.done() for c in calls)  # gRPC replies end once their rows are in
            refused = asyncio.ensure_future(collect(ch, "hi", bearer(key)))  # 1.0 of 1.0
            await asyncio.sleep(0.1)
            release.set()
            replies = await asyncio.gather(*calls)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await refused
        assert all(r[-1].WhichOneof("event") == "final" for r in replies)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "5h window" in (caught.value.details() or "")
        assert backend.impl.peak["steady"] == 1
        assert gw.store.sync.total_usage() == pytest.approx((2, 1.0))
    finally:
        release.set()
        await gw.stop(0)


async def test_get_usage_reports_in_flight(gateway: Gateway, channel: grpc.aio.Channel) -> None:
    key = await new_key(gateway, "busybee", "pro")
    running = asyncio.ensure_future(collect(channel, "sleep:0.5", bearer(key)))
    await asyncio.sleep(0.15)
    usage = await usage_pb2_grpc.UsageServiceStub(channel).GetUsage(
        usage_pb2.GetUsageRequest(), metadata=bearer(key)
    )
    await running
    assert usage.tenant == "busybee" and usage.requests_in_flight == 1
    assert {w.name for w in usage.windows} == {"5h", "7d"}


async def test_admin_needs_the_admin_token(gateway: Gateway, channel: grpc.aio.Channel) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    tenant_key = await new_key(gateway, "tenant", "max")
    request = admin_pb2.CreateKeyRequest(tenant="newco", tier="pro", description="ci")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateKey(request, metadata=bearer(tenant_key))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateKey(request)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    created = await admin.CreateKey(request, metadata=bearer(ADMIN_TOKEN))
    assert created.secret.startswith(f"ds_{created.key.key_id}_")
    listed = await admin.ListKeys(
        admin_pb2.ListKeysRequest(tenant="newco"), metadata=bearer(ADMIN_TOKEN)
    )
    assert [k.key_id for k in listed.keys] == [created.key.key_id]
    row = gateway.store.sync.get_key(created.key.key_id)
    assert row is not None and created.secret not in repr(row)  # only the hash is stored
    assert (await collect(channel, "hi", bearer(created.secret)))[-1].HasField("final")
    revoked = await admin.RevokeKey(
        admin_pb2.RevokeKeyRequest(key_id=created.key.key_id), metadata=bearer(ADMIN_TOKEN)
    )
    assert revoked.key.HasField("revoke_time")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(channel, "hi", bearer(created.secret))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateKey(
            admin_pb2.CreateKeyRequest(tenant="Bad Name!", tier="pro"), metadata=bearer(ADMIN_TOKEN)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("tenant:")


async def test_metrics_count_by_code_and_tier_without_keys(
    gateway: Gateway, channel: grpc.aio.Channel
) -> None:
    key = await new_key(gateway, "metered", "pro")
    await collect(channel, "hi", bearer(key))
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(channel, "hi", bearer("ds_0123456789ab_" + "y" * 30))
    assert gateway.server.metrics_port
    text = await asyncio.to_thread(metrics_text, gateway.server.metrics_port)
    assert (
        'dreamsight_gateway_requests_total{code="OK",method="Chat",protocol="grpc",'
        'service="VisionService",tier="pro"} 1.0' in text
    )
    assert 'dreamsight_gateway_rejections_total{reason="unauthenticated",tier="none"} 1.0' in text
    assert 'dreamsight_gateway_gpu_seconds_total{service="VisionService",tier="pro"} 0.5' in text
    assert "dreamsight_gateway_time_to_first_chunk_seconds_count" in text
    assert key not in text and "metered" not in text


async def test_round_robin_over_healthy_backends_only(tmp_path: Path) -> None:
    """Several addresses behind one target: calls spread over all of them, and
    a backend whose health goes NOT_SERVING gets no more calls (each chat on
    its own stream; lanes spread per lane, see test_lanes.py)."""
    from grpc_health.v1 import health_pb2

    first, second = FakeBackend(FakeVision()), FakeBackend(FakeVision())
    await first.start()
    await second.start()
    gw = await gateway_for(tmp_path, first.port, metrics_port=None)
    await gw.stop(0)
    from dataclasses import replace

    from gateway.server import start_gateway

    target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
    gw = await start_gateway(replace(gw.settings, vision_target=target, lane_calls=0))
    try:
        key = await new_key(gw, "spread", "max")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            for _ in range(20):
                await collect(ch, "hi", bearer(key))
            assert first.impl.finished > 0 and second.impl.finished > 0
            assert first.impl.finished + second.impl.finished == 20
            assert first.health is not None
            await first.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            await asyncio.sleep(0.5)  # the gateway's health watch sees it
            before = first.impl.finished
            for _ in range(10):
                await collect(ch, "hi", bearer(key))
            assert first.impl.finished == before, "no calls to a NOT_SERVING backend"
    finally:
        await gw.stop(0)
        await first.kill()
        await second.kill()
