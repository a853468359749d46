"""The gateway's own CPU per streamed token on the OpenAI HTTP chat path.

    python bench/bench_gateway_chat.py [--streams 16] [--tokens 32] [--step-ms 5]
                                       [--requests 640] [--rounds 3]

A paced fake vision service (``bench/fake_backend.py``: every call's next
delta on one shared clock tick, as an engine step gives one token to each
running request, lanes on) behind a real ``python -m gateway`` with a key,
admission, the SQLite ledger and metering; an aiohttp client in this process
keeps ``--streams`` streaming ``/v1/chat/completions`` requests going and
reads every event. What is measured is the gateway process's CPU time
(user + system) divided by the tokens the client received: the part of
``make bench-openai``'s CPU per token that the gateway adds on top of the
vision service, without a model's noise around it. The best of the rounds
counts.

Last line: ``bench gateway chat: cpu_us_per_token=A tokens_per_s=B streams=S``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil  # type: ignore[import-untyped]
from stack import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent


def _backend(env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "fake_backend.py")],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"listening on [\d.]+:(\d+)", line)
        if found:
            return proc, int(found.group(1))
    raise RuntimeError("the fake backend never listened")


async def _stream(session: aiohttp.ClientSession, url: str, key: str, content: str) -> int:
    """One streamed chat; the deltas received."""
    body = {
        "model": "fake",
        "stream": True,
        "messages": [{"role": "user", "content": content}],
    }
    tokens = 0
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as reply:
        if reply.status != 200:
            raise RuntimeError(f"{reply.status}: {await reply.text()}")
        async for line in reply.content:
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                tokens += 1
    return tokens


async def _round(url: str, key: str, streams: int, requests: int, content: str) -> int:
    """requests chats, streams at once; the deltas received in all."""
    queue = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=streams)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> int:
            got = 0
            for _ in queue:
                got += await _stream(session, url, key, content)
            return got

        return sum(await asyncio.gather(*(worker() for _ in range(streams))))


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    backend, backend_port = _backend(env)
    gateway = GatewayProcess(Path(tempfile.mkdtemp(prefix="bench-gateway-chat-")), backend_port)
    gateway.env = {"PYTHONPATH": os.environ.get("GW_PYTHONPATH", "") + str(ROOT)}
    try:
        gateway.start()
        key = gateway.serving()
        url = f"http://127.0.0.1:{gateway.http_port}/v1/chat/completions"
        content = f"steps:{args.tokens}:{args.step_ms}"
        await _round(url, key, args.streams, args.streams * 2, content)  # warm-up
        proc = psutil.Process(gateway.running.pid)
        best: tuple[float, float] | None = None
        for number in range(args.rounds):
            cpu, start = _cpu(proc), time.perf_counter()
            tokens = await _round(url, key, args.streams, args.requests, content)
            wall, spent = time.perf_counter() - start, _cpu(proc) - cpu
            if tokens != args.requests * args.tokens:
                raise RuntimeError(f"got {tokens} tokens, expected {args.requests * args.tokens}")
            per_token_us, rate = spent / tokens * 1e6, tokens / wall
            print(f"round {number + 1}: {per_token_us:.1f} us CPU per token, {rate:.0f} tokens/s")
            if best is None or per_token_us < best[0]:
                best = (per_token_us, rate)
        assert best is not None
        print(
            f"bench gateway chat: cpu_us_per_token={best[0]:.1f} tokens_per_s={best[1]:.0f} "
            f"streams={args.streams}"
        )
    finally:
        gateway.stop()
        backend.terminate()
        backend.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
