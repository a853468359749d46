"""Lanes: many chats on one stream between the gateway and a vision replica
(gateway.lanes, dreamsight_server.lanes), behind real gRPC servers on loopback.

The metering rules on lanes (every ending billed what the backend spent, the
slot back only after) run in tests/test_metering.py on both transports; here
is what is particular to sharing a stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from dreamsight.internal.v1 import lanes_pb2
from dreamsight.vision.v1 import vision_pb2_grpc

from dreamsight_server.lanes import LANE_PATH
from dreamsight_server.metadata import LANES_HEADER
from gateway import lanes as gateway_lanes
from gateway.config import MAX_REQUEST_BYTES
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


@pytest.fixture
async def gateway(tmp_path: Path, backend: FakeBackend) -> AsyncIterator[Gateway]:
    gw = await gateway_for(tmp_path, backend.port, queue_length=40, queue_wait_s=20, lane_calls=4)
    yield gw
    await gw.stop(0)


@pytest.fixture
async def channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        yield ch


def _pool(gateway: Gateway) -> gateway_lanes.LanePool:
    pool = gateway_lanes.pool_for(gateway.channels[0], "VisionService.Chat")
    assert pool is not None
    return pool


async def _billed(gateway: Gateway, tenant: str, rows: int) -> list[float]:
    for _ in range(200):
        entries = gateway.store.sync.usage_entries(tenant, 0)
        if len(entries) >= rows:
            assert not any(e.estimated for e in entries)
            return [e.gpu_seconds for e in entries]
        await asyncio.sleep(0.02)
    raise AssertionError(f"{tenant}: fewer than {rows} ledger rows")


async def test_concurrent_chats_share_lanes_and_their_replies_batch(
    gateway: Gateway,
    backend: FakeBackend,
    channel: grpc.aio.Channel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight tenants at once on lanes of four: two lanes, each chat gets its own
    deltas in order, each tenant is what the backend saw and is billed once,
    and the backend sent fewer lane messages than chat messages."""
    replies: list[int] = []
    real = lanes_pb2.LaneReply

    def counting(**fields: object) -> lanes_pb2.LaneReply:
        reply = real(**fields)  # type: ignore[arg-type]
        replies.append(len(reply.items))
        return reply

    monkeypatch.setattr(lanes_pb2, "LaneReply", counting)  # as the backend's lanes see it
    tenants = [f"t{i}" for i in range(8)]
    keys = [await new_key(gateway, tenant, "max") for tenant in tenants]
    results = await asyncio.gather(*(collect(channel, "chunks:40", bearer(k)) for k in keys))
    for messages in results:
        assert [m.delta for m in messages[:-1]] == [f"t{i} " for i in range(40)]
        assert messages[-1].final.completion_tokens == 40
    assert sorted(set(backend.impl.tenants)) == tenants
    for tenant in tenants:
        assert await _billed(gateway, tenant, 1) == pytest.approx([0.25])
        await no_slots_held(gateway, tenant)
    items = sum(replies)
    assert items >= 8 * 43  # started, 41 messages and the end, per chat
    assert len(replies) < items, "replies carry several calls' items"
    assert _pool(gateway).lanes <= 2


async def test_stopping_one_chat_leaves_the_others_on_its_lane(
    gateway: Gateway, backend: FakeBackend, channel: grpc.aio.Channel
) -> None:
    """A caller that cancels stops its own chat (billed what it spent), while
    the chat beside it on the same lane runs to its end."""
    quitter, stayer = (
        await new_key(gateway, "quitter", "max"),
        await new_key(gateway, "stayer", "max"),
    )
    stub = vision_pb2_grpc.VisionServiceStub(channel)
    stopped = stub.Chat(chat_request("slowstop:0.2"), metadata=bearer(quitter))
    kept = asyncio.ensure_future(collect(channel, "sleep:1.0", bearer(stayer)))
    for _ in range(100):
        if backend.impl.running["quitter"] and backend.impl.running["stayer"]:
            break
        await asyncio.sleep(0.02)
    assert _pool(gateway).lanes == 1
    stopped.cancel()
    assert await _billed(gateway, "quitter", 1) == pytest.approx([0.25])
    messages = await kept
    assert messages[-1].final.completion_tokens == 3
    assert await _billed(gateway, "stayer", 1) == pytest.approx([0.25])
    assert backend.impl.cancelled == 1 and backend.impl.finished == 1


async def test_a_slow_caller_holds_back_only_its_own_chat(
    gateway: Gateway, backend: FakeBackend, channel: grpc.aio.Channel
) -> None:
    """A caller that stops reading a big reply: its chat waits on its window,
    and another chat on the same lane still gets every message."""
    slow, fast = await new_key(gateway, "slow", "max"), await new_key(gateway, "fast", "max")
    stub = vision_pb2_grpc.VisionServiceStub(channel)
    stalled = stub.Chat(chat_request("big:400"), metadata=bearer(slow)).__aiter__()
    await stalled.__anext__()
    messages = await collect(channel, "chunks:50", bearer(fast))
    assert messages[-1].final.completion_tokens == 50
    await asyncio.sleep(0.5)
    assert backend.impl.produced - 50 < 100, "the stalled chat is held back by its window"
    received = 1
    async for _ in stalled:
        received += 1
    assert received == 401


async def test_a_replica_that_dies_ends_every_chat_on_its_lane_with_an_estimate(
    gateway: Gateway, backend: FakeBackend, channel: grpc.aio.Channel
) -> None:
    keys = [await new_key(gateway, f"d{i}", "max") for i in range(3)]
    calls = [asyncio.ensure_future(collect(channel, "slowstop:0", bearer(key))) for key in keys]
    for _ in range(100):
        if sum(backend.impl.running.values()) == 3:
            break
        await asyncio.sleep(0.02)
    await backend.kill()
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    for i in range(3):
        await no_slots_held(gateway, f"d{i}")
        entries = gateway.store.sync.usage_entries(f"d{i}", 0)
        assert len(entries) == 1 and entries[0].estimated


async def test_a_retiring_replica_takes_no_new_chats_and_finishes_its_own(
    gateway: Gateway, backend: FakeBackend, channel: grpc.aio.Channel
) -> None:
    """Once the replica says it is shutting down, no new chat goes on its lanes
    (with no other replica, the next one is refused as UNAVAILABLE, slot back),
    the chat running there ends normally, and then its lane closes."""
    key = await new_key(gateway, "r", "max")
    running = asyncio.ensure_future(collect(channel, "sleep:1.0", bearer(key)))
    await asyncio.sleep(0.3)
    pool = _pool(gateway)
    assert pool.lanes == 1
    assert backend.lanes is not None
    backend.lanes.retire()
    await asyncio.sleep(0.2)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(channel, "hi", bearer(key))
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert (await running)[-1].final.completion_tokens == 3
    await no_slots_held(gateway, "r")
    for _ in range(50):
        if pool.lanes == 0:
            break
        await asyncio.sleep(0.02)
    assert pool.lanes == 0, "an idle retired lane is closed"


async def test_a_replica_without_lanes_serves_chats_on_their_own_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica from before lanes (a rolling upgrade) answers a lane with
    UNIMPLEMENTED: the chats that were on it go on their own settled streams
    unseen by their callers, each billed what the replica reported, and the
    chats after them go there directly, without another lane."""
    opened: list[object] = []
    real = gateway_lanes._Lane

    class CountedLane(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object) -> None:
            opened.append(self)
            super().__init__(*args)

    monkeypatch.setattr(gateway_lanes, "_Lane", CountedLane)
    old = FakeBackend(FakeVision(gpu_seconds=0.25), lanes=False)
    await old.start()
    gw = await gateway_for(tmp_path, old.port, queue_length=40, queue_wait_s=20, lane_calls=4)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
            keys = [await new_key(gw, f"u{i}", "max") for i in range(3)]
            results = await asyncio.gather(
                *(collect(channel, "chunks:5", bearer(k), timeout=30) for k in keys)
            )
            assert len(opened) == 1, "the three chats were on one lane"
            later = await collect(channel, "chunks:5", bearer(keys[0]))
        for messages in [*results, later]:
            assert [m.delta for m in messages[:-1]] == [f"t{i} " for i in range(5)]
            assert messages[-1].final.completion_tokens == 5
        assert len(opened) == 1, "the chat after went on its own stream"
        assert _pool(gw).lanes == 0
        for i in range(3):
            rows = 2 if i == 0 else 1
            assert await _billed(gw, f"u{i}", rows) == pytest.approx([0.25] * rows)
            await no_slots_held(gw, f"u{i}")
    finally:
        await gw.stop(0)
        await old.kill()


async def _carry(port: int, *requests: lanes_pb2.LaneRequest, metadata: Any = ()) -> Any:
    """A lane opened directly on a replica (not through a gateway): the requests
    written, then the replies read until every call opened has ended."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        carry: Any = channel.stream_stream(
            LANE_PATH, lanes_pb2.LaneRequest.SerializeToString, lanes_pb2.LaneReply.FromString
        )
        stream = carry(metadata=metadata)
        if not any(key == LANES_HEADER for key, _ in await stream.initial_metadata() or ()):
            await stream.read()  # the lane was refused: this raises why
        for request in requests:
            await stream.write(request)
        ends: dict[int, lanes_pb2.LaneEnd] = {}
        every = [r for request in requests for r in (request, *request.batch)]
        opened = {r.call for r in every if r.WhichOneof("action") == "open"}
        async with asyncio.timeout(10):
            while set(ends) != opened:
                reply = await stream.read()
                for item in reply.items:
                    if item.WhichOneof("event") == "end":
                        ends[item.call] = item.end
        stream.cancel()
        return ends


def _open(number: int, text: str, **fields: Any) -> lanes_pb2.LaneRequest:
    request = chat_request(text).SerializeToString()
    return lanes_pb2.LaneRequest(
        call=number,
        open=lanes_pb2.LaneOpen(method="VisionService.Chat", request=request, **fields),
    )


async def test_a_big_request_goes_on_its_own_stream_and_fails_only_itself(
    tmp_path: Path, backend: FakeBackend
) -> None:
    """A request over the replica's receive limit (the gateway takes up to its
    own, larger one) fails on a stream of its own: the chat of another tenant
    that shares its lane runs to its end, billed what the replica reported."""
    gw = await gateway_for(
        tmp_path, backend.port, lane_calls=4, max_receive_bytes=MAX_REQUEST_BYTES
    )
    options = [("grpc.max_send_message_length", MAX_REQUEST_BYTES)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}", options=options) as channel:
            victim, sender = await new_key(gw, "victim", "max"), await new_key(gw, "big", "max")
            kept = asyncio.ensure_future(collect(channel, "sleep:1.0", bearer(victim)))
            await asyncio.sleep(0.3)
            assert _pool(gw).lanes == 1
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect(channel, "x" * (5 << 20), bearer(sender))
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await kept)[-1].final.completion_tokens == 3
        assert await _billed(gw, "victim", 1) == pytest.approx([0.25])
        await no_slots_held(gw, "big")
    finally:
        await gw.stop(0)


async def test_a_lane_is_taken_only_with_the_gateway_token(tmp_path: Path) -> None:
    secret = "lane-secret"
    guarded = FakeBackend(FakeVision(gpu_seconds=0.25), secret=secret)
    await guarded.start()
    gw = await gateway_for(tmp_path, guarded.port, lane_calls=4, backend_secret=secret)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _carry(guarded.port, _open(1, "hi"))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert not guarded.impl.tenants, "nothing ran for a caller without the token"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
            key = await new_key(gw, "t", "max")
            assert (await collect(channel, "chunks:5", bearer(key)))[-1].final.completion_tokens
            assert _pool(gw).lanes == 1, "the gateway's lane was taken"
    finally:
        await gw.stop(0)
        await guarded.kill()


async def test_a_lane_call_with_a_timeout_that_is_not_a_number_is_refused(
    backend: FakeBackend,
) -> None:
    ends = await _carry(
        backend.port,
        _open(1, "hi", timeout_seconds=float("nan")),
        _open(2, "hi", timeout_seconds=-1.0),
        _open(3, "chunks:2", timeout_seconds=5.0),
    )
    for number in (1, 2):
        assert ends[number].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "timeout_seconds" in ends[number].details
    assert ends[3].code == grpc.StatusCode.OK.value[0]
    assert len(backend.impl.tenants) == 1, "only the call with a good timeout ran"


async def test_a_lane_call_that_fails_before_its_end_still_ends(
    backend: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault in the lane's own code (here the device share) ends that call
    with INTERNAL, instead of leaving the gateway to wait for its end."""
    assert backend.lanes is not None

    def broken() -> float:
        raise RuntimeError("no share")

    monkeypatch.setattr(backend.lanes, "device_share", broken)
    ends = await _carry(backend.port, _open(1, "hi"))
    assert ends[1].code == grpc.StatusCode.INTERNAL.value[0]
    assert "no share" not in ends[1].details


def test_requests_queued_together_go_in_one_message_up_to_the_size_of_a_lane_request() -> None:
    """The gateway's writer sends what queued while its last write was out as
    one message: the first request with the rest in its batch, in order, until
    their opened requests would pass LANE_REQUEST_BYTES."""
    from collections import deque

    half = gateway_lanes.LANE_REQUEST_BYTES // 2
    outbox = deque(
        [
            _open(1, "a"),
            lanes_pb2.LaneRequest(call=7, stop=True),
            lanes_pb2.LaneRequest(call=8, consumed_bytes=512),
            _open(2, "x" * half),
            _open(3, "y" * half),
            _open(4, "z"),
        ]
    )
    first = gateway_lanes._next_message(outbox)
    assert first.call == 1 and first.WhichOneof("action") == "open"
    assert [r.call for r in first.batch] == [7, 8, 2]
    assert [r.WhichOneof("action") for r in first.batch] == ["stop", "consumed_bytes", "open"]
    second = gateway_lanes._next_message(outbox)
    assert (second.call, [r.call for r in second.batch]) == (3, [4])
    assert not outbox


async def test_a_replica_takes_the_requests_batched_behind_one(backend: FakeBackend) -> None:
    """Version 2 of lanes, read by the replica: the calls in a request's batch
    are opened and run as if each had come in its own message."""
    first = _open(1, "chunks:3")
    first.batch.extend([_open(2, "chunks:2"), _open(3, "chunks:4")])
    ends = await _carry(backend.port, first)
    assert sorted(ends) == [1, 2, 3]
    assert all(end.code == 0 and end.gpu_seconds == pytest.approx(0.25) for end in ends.values())


async def test_chats_opened_together_share_a_message_only_on_a_replica_that_reads_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight chats opened at once: to a replica of lanes version 2 some go in
    one message; to one of version 1 (before batches) each goes in its own.
    Either way every chat gets its deltas and is billed once."""
    from dreamsight_server import lanes as server_lanes

    real = gateway_lanes._next_message
    for version in (2, 1):
        written: list[int] = []

        def counted(outbox: Any, written: list[int] = written) -> lanes_pb2.LaneRequest:
            message = real(outbox)
            written.append(1 + len(message.batch))
            return message

        monkeypatch.setattr(gateway_lanes, "_next_message", counted)
        monkeypatch.setattr(server_lanes, "LANES_VERSION", version)
        replica = FakeBackend(FakeVision(gpu_seconds=0.25))
        await replica.start()
        (tmp_path / f"v{version}").mkdir()
        gw = await gateway_for(tmp_path / f"v{version}", replica.port, lane_calls=8)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
                keys = [await new_key(gw, f"v{version}t{i}", "max") for i in range(8)]
                results = await asyncio.gather(
                    *(collect(channel, "chunks:5", bearer(k)) for k in keys)
                )
            for messages in results:
                assert [m.delta for m in messages[:-1]] == [f"t{i} " for i in range(5)]
            for i in range(8):
                assert await _billed(gw, f"v{version}t{i}", 1) == pytest.approx([0.25])
        finally:
            await gw.stop(0)
            await replica.kill()
        if version == 2:
            assert max(written) > 1, "chats opened together went in one message"
        else:
            assert written == [], "a replica before batches gets one request per message"
