"""What one streamed gRPC message costs a grpc.aio server, flat out and paced.

    python bench/bench_grpc_stream.py [--messages N] [--paced-messages N] [--gap-ms G]

A grpc.aio server in its own process (uvloop, as our services run) streams small
messages (40 bytes, about one token's delta) to a grpc.aio client in this process,
in the two handler styles our services could use: ``context.write`` in a
stream-stream handler (the settled handlers of dreamsight_server.metering) and an
async generator in a unary-stream handler. Each is measured twice:

- **flat out**: the messages back to back, as a busy server sends them;
- **paced**: one message every ``--gap-ms`` (2 ms: one engine step of the demo
  model at one sequence), as a stream of one request at a time sends them.

Reports the server's CPU per message (user + system), alternating the styles,
three rounds, medians. The last line::

    bench grpc stream: flat_us_write=A flat_us_yield=B paced_us_write=C paced_us_yield=D sleep_us=E

E is the paced loop's own cost per message (the same ``asyncio.sleep`` with no
message), so C - E is what a message sent alone costs.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

PAYLOAD = b"x" * 40
SERVICE = "bench.Stream"


def _same(data: bytes) -> bytes:
    return data


async def _serve(port_queue: Any, gap_s: float) -> None:
    async def nap() -> None:
        if gap_s:
            await asyncio.sleep(gap_s)

    async def via_write(_: Any, context: Any) -> None:
        count = int(await context.read())
        for _ in range(count):
            await nap()
            await context.write(PAYLOAD)

    async def via_yield(request: bytes, _: Any) -> AsyncIterator[bytes]:
        for _ in range(int(request)):
            await nap()
            yield PAYLOAD

    async def sleep_only(request: bytes, _: Any) -> bytes:
        for _ in range(int(request)):
            await nap()
        return b""

    handlers = {
        "Write": grpc.stream_stream_rpc_method_handler(
            via_write, request_deserializer=_same, response_serializer=_same
        ),
        "Yield": grpc.unary_stream_rpc_method_handler(
            via_yield, request_deserializer=_same, response_serializer=_same
        ),
        "Sleep": grpc.unary_unary_rpc_method_handler(
            sleep_only, request_deserializer=_same, response_serializer=_same
        ),
    }
    await serve_handlers(SERVICE, handlers, port_queue)


async def serve_handlers(service: str, handlers: dict[str, Any], port_queue: Any) -> None:
    """A grpc.aio server of these method handlers on a free loopback port, put on
    port_queue, until the process ends."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_queue.put(port)
    await server.wait_for_termination()


def _server_main(port_queue: Any, gap_s: float) -> None:
    import uvloop

    uvloop.install()
    asyncio.run(_serve(port_queue, gap_s))


async def _call(port: int, method: str, count: int) -> int:
    request = str(count).encode()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        path = f"/{SERVICE}/{method}"
        if method == "Sleep":
            await channel.unary_unary(path, _same, _same)(request)
            return count
        if method == "Write":
            write: Any = channel.stream_stream(path, _same, _same)
            call: Any = write()
            await call.write(request)
            await call.done_writing()
        else:
            call = channel.unary_stream(path, _same, _same)(request)
        received = 0
        async for _ in call:
            received += 1
        return received


def _measure(gap_s: float, count: int, methods: tuple[str, ...]) -> dict[str, float]:
    """Median server CPU microseconds per message, by method, over three rounds."""
    import psutil  # type: ignore[import-untyped]

    queue: Any = mp.Queue()
    server = mp.Process(target=_server_main, args=(queue, gap_s), daemon=True)
    server.start()
    try:
        port = queue.get(timeout=30)
        process = psutil.Process(server.pid)
        asyncio.run(_call(port, methods[0], 10))  # warm-up
        samples: dict[str, list[float]] = {m: [] for m in methods}
        for round_ in range(3):
            order = methods if round_ % 2 == 0 else tuple(reversed(methods))
            for method in order:
                before = process.cpu_times()
                received = asyncio.run(_call(port, method, count))
                after = process.cpu_times()
                if received != count:
                    raise SystemExit(f"{method}: {received} of {count} messages")
                spent = after.user + after.system - before.user - before.system
                samples[method].append(1e6 * spent / count)
        return {m: statistics.median(v) for m, v in samples.items()}
    finally:
        server.terminate()
        server.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--paced-messages", type=int, default=1_500)
    parser.add_argument("--gap-ms", type=float, default=2.0)
    args = parser.parse_args()
    started = time.monotonic()
    flat = _measure(0.0, args.messages, ("Write", "Yield"))
    paced = _measure(args.gap_ms / 1e3, args.paced_messages, ("Write", "Yield", "Sleep"))
    for name, figures in (("flat out", flat), (f"paced ({args.gap_ms:g} ms)", paced)):
        row = "  ".join(f"{m.lower()} {us:7.1f} us/msg" for m, us in figures.items())
        print(f"{name:14} {row}")
    print(f"({time.monotonic() - started:.0f} s)")
    print(
        f"bench grpc stream: flat_us_write={flat['Write']:.1f} flat_us_yield={flat['Yield']:.1f}"
        f" paced_us_write={paced['Write']:.1f} paced_us_yield={paced['Yield']:.1f}"
        f" sleep_us={paced['Sleep']:.1f}"
    )


if __name__ == "__main__":
    main()
