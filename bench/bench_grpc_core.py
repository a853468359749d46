"""What gRPC's EventEngine costs each streamed message, on both ends of a hop.

    python bench/bench_grpc_core.py [--rounds N] [--streams N] [--messages N] [--gap-ms G]

The hop every chat token crosses between the vision service and the gateway:
a grpc.aio server on asyncio's loop (as the vision service runs, beside vLLM)
streams small messages (40 bytes, about one token's delta) to a grpc.aio
client on uvloop (as the gateway runs), ``--streams`` streams at once, each
message ``--gap-ms`` after the last (one engine step at 16 sequences), in two
gRPC core settings, alternating, ``--rounds`` times:

- **iomgr**: as our services run gRPC (``dreamsight_server.grpc_core``: the
  EventEngine off for sockets, so the completion queue's poller reads them);
- **event engine**: as gRPC 1.85 ships (``GRPC_EXPERIMENTS`` empty).

``GRPC_EXPERIMENTS`` is read when grpc loads, so each measurement runs in
fresh processes. Reports the writer's and the reader's CPU per message (user
+ system, medians); the last line (A, C: iomgr, as our services run)::

    bench grpc core: reader_us=A reader_us_event_engine=B writer_us=C writer_us_event_engine=D

Both writers include the same paced loop's own cost per message (its
``asyncio.sleep``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

PAYLOAD = b"x" * 40
SERVICE = "bench.Core"
SETTINGS = ("iomgr", "event engine")


def _same(data: bytes) -> bytes:
    return data


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


async def _serve(port_queue: Any, gap_s: float) -> None:
    import grpc  # here, not at the top: GRPC_EXPERIMENTS is read when grpc loads
    from bench_grpc_stream import serve_handlers

    async def stream(request: bytes, _: Any) -> AsyncIterator[bytes]:
        for _ in range(int(request)):
            await asyncio.sleep(gap_s)
            yield PAYLOAD

    async def cpu(_: bytes, __: Any) -> bytes:
        return str(_cpu_s()).encode()

    handlers = {
        "Stream": grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=_same, response_serializer=_same
        ),
        "Cpu": grpc.unary_unary_rpc_method_handler(
            cpu, request_deserializer=_same, response_serializer=_same
        ),
    }
    await serve_handlers(SERVICE, handlers, port_queue)


def _server_main(port_queue: Any, gap_s: float) -> None:
    asyncio.run(_serve(port_queue, gap_s))


async def _drive(port: int, streams: int, messages: int, rounds: int) -> tuple[float, float]:
    """(writer, reader) CPU microseconds per message over ``rounds`` batches of streams."""
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.unary_stream(f"/{SERVICE}/Stream", _same, _same)
        cpu = channel.unary_unary(f"/{SERVICE}/Cpu", _same, _same)

        async def one() -> int:
            received = 0
            async for _ in stream(str(messages).encode()):
                received += 1
            return received

        await asyncio.gather(*(one() for _ in range(streams)))  # warm-up
        writer_before, reader_before = float(await cpu(b"")), _cpu_s()
        for _ in range(rounds):
            got = await asyncio.gather(*(one() for _ in range(streams)))
            if got != [messages] * streams:
                raise SystemExit(f"received {got}, expected {messages} on each stream")
        writer_after, reader_after = float(await cpu(b"")), _cpu_s()
    total = streams * messages * rounds
    return (
        1e6 * (writer_after - writer_before) / total,
        1e6 * (reader_after - reader_before) / total,
    )


def _worker(streams: int, messages: int, gap_ms: float) -> None:
    """One measurement in this process (the reader) and a child (the writer)."""
    import multiprocessing as mp

    import uvloop

    queue: Any = mp.get_context("fork").Queue()
    server = mp.get_context("fork").Process(
        target=_server_main, args=(queue, gap_ms / 1e3), daemon=True
    )
    server.start()  # forked before this process loads grpc
    try:
        port = queue.get(timeout=30)
        writer, reader = uvloop.run(_drive(port, streams, messages, rounds=4))
    finally:
        server.terminate()
        server.join(10)
    print(json.dumps({"writer_us": writer, "reader_us": reader}))


def _measure(setting: str, args: argparse.Namespace) -> dict[str, float]:
    from dreamsight_server import grpc_core

    env = dict(os.environ)
    env[grpc_core.VARIABLE] = ",".join(grpc_core.EXPERIMENTS) if setting == "iomgr" else ""
    done = subprocess.run(
        [sys.executable, __file__, "--worker", f"--streams={args.streams}",
         f"--messages={args.messages}", f"--gap-ms={args.gap_ms}"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{setting}: the worker failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--messages", type=int, default=128)
    parser.add_argument("--gap-ms", type=float, default=6.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.streams, args.messages, args.gap_ms)
        return
    samples: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
    for round_ in range(args.rounds):
        for setting in SETTINGS if round_ % 2 == 0 else tuple(reversed(SETTINGS)):
            samples[setting].append(_measure(setting, args))
    med = {
        (s, part): statistics.median(r[part] for r in runs)
        for s, runs in samples.items()
        for part in ("writer_us", "reader_us")
    }
    print(f"{'gRPC core':13} {'writer us/msg':>14} {'reader us/msg':>14}")
    for s in SETTINGS:
        print(f"{s:13} {med[(s, 'writer_us')]:>14.1f} {med[(s, 'reader_us')]:>14.1f}")
    print(
        f"bench grpc core: reader_us={med[('iomgr', 'reader_us')]:.1f}"
        f" reader_us_event_engine={med[('event engine', 'reader_us')]:.1f}"
        f" writer_us={med[('iomgr', 'writer_us')]:.1f}"
        f" writer_us_event_engine={med[('event engine', 'writer_us')]:.1f}"
    )


if __name__ == "__main__":
    main()
