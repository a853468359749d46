"""A bare grpc.aio pass-through, the reference the gateway's cost is judged by.

    python bench/bare_proxy.py LISTEN_PORT BACKEND_PORT

Forwards every unary and server-streaming call as bytes, with no auth,
admission, metering or metrics: what any Python gRPC proxy must pay.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc


class Bare(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        if method.endswith("/Chat"):
            call = self._channel.unary_stream(method, None, None)

            async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
                async for chunk in call(request, timeout=context.time_remaining()):
                    yield chunk

            return grpc.unary_stream_rpc_method_handler(stream)
        unary_call = self._channel.unary_unary(method, None, None)

        async def unary(request: bytes, context: Any) -> bytes:
            response: bytes = await unary_call(request, timeout=context.time_remaining())
            return response

        return grpc.unary_unary_rpc_method_handler(unary)


async def main(port: int, backend_port: int) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{backend_port}")
    server = grpc.aio.server(options=[("grpc.server.max_pending_requests", 10_000)])
    server.add_generic_rpc_handlers((Bare(channel),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
