"""A caller that reads slowly holds the backend back instead of making the
gateway buffer the whole stream (gRPC flow control end to end)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from dreamsight.vision.v1 import vision_pb2_grpc

from tests.gateway_helpers import (
    FakeBackend,
    FakeVision,
    bearer,
    chat_request,
    gateway_for,
    new_key,
)

CHUNKS = 2000  # 2000 x 64 KiB = 125 MiB if it were all buffered
CHUNK_BYTES = 65536


async def test_slow_reader_bounds_what_is_in_flight(tmp_path: Path) -> None:
    backend = FakeBackend(FakeVision())
    await backend.start()
    gateway = await gateway_for(tmp_path, backend.port, metrics_port=None)
    try:
        key = await new_key(gateway, "slowpoke", "pro")
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{gateway.port}", options=[("grpc.max_receive_message_length", -1)]
        ) as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            call = stub.Chat(chat_request(f"big:{CHUNKS}"), metadata=bearer(key))
            iterator = call.__aiter__()
            await iterator.__anext__()  # read one chunk, then stall
            await asyncio.sleep(2.0)
            produced_while_stalled = backend.impl.produced
            buffered_mib = produced_while_stalled * CHUNK_BYTES / 2**20
            print(f"produced while stalled: {produced_while_stalled} ({buffered_mib:.1f} MiB)")
            assert produced_while_stalled < CHUNKS / 4, (
                f"{produced_while_stalled} chunks ({buffered_mib:.0f} MiB) produced while the "
                "caller read one: something buffers without bound"
            )
            received = 1
            async for _ in iterator:
                received += 1
        assert received == CHUNKS + 1  # every delta and the final message
        assert backend.impl.produced == CHUNKS
    finally:
        await gateway.stop(0)
        await backend.kill()
