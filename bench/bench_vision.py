"""Vision benchmark: the engine alone vs our gRPC service vs vLLM's OpenAI server.

    python bench/bench_vision.py [--rounds N] [--tokens N]

Same tiny demo LLaVA, prompt, image and machine, in one run:

(a) vLLM AsyncLLM in-process (the engine our service wraps, driven directly
    with pre-rendered prompt ids and a decoded image: the floor);
(b) our VisionService over gRPC on loopback (PNG decoding, chat template,
    validation, metering and metrics included), called directly (``grpc``)
    and through the gateway (``gateway``: its own process, as ``dreamsight
    up`` starts it, a key on a tier that admits the whole load);
(c) vLLM's own OpenAI-compatible server (``python -m
    vllm.entrypoints.openai.api_server``) streaming the same chat with the
    image as a data URL.

(b) and (c) each run as their own server process, as deployed, and the
clients of all three share this process. Rounds alternate
a/b/c so drift on the shared cores hits all three alike. Reports TTFT p50/p95
and aggregate completion tokens/s at 1 and 8 concurrent streams.

Then the gRPC path through the gateway on text chats (no image, the load
of issue 17): ``--text-chats`` chats (96), 8 at once, up to 32 tokens, the
vision service called directly and through the gateway, ``--text-rounds``
runs each (4), alternating direct/gateway then gateway/direct. Reports
chunks/s (stream messages carrying text) and TTFT p50 both ways.

The last line is ``bench vision: ttft_p50_added_ms=X throughput_vs_engine=Y
throughput_vs_vllm_openai=Z gateway_throughput_vs_direct=G
gateway_ttft_p50_added_ms=T text_chunks_ratio=R text_ttft_p50_ms=D/W``
(X: (b) direct minus (a) at 1 stream; Y, Z and G at 8; T: through the
gateway minus direct at 1, with the image; R: text chats' chunks/s through
the gateway over direct, median of the runs; D and W: their TTFT p50
direct and through the gateway). ``--paths grpc,gateway`` measures only
those image paths (the metrics that need the others are left out).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stack import GatewayProcess, free_port

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPT = "Describe this image in detail."
TEXT_PROMPT = "Write a short story about a lighthouse keeper and a storm."


@dataclass
class Sample:
    """One stream: time to first token and completion tokens."""

    ttft_s: float
    tokens: int
    chunks: int = 0
    """Stream messages that carried text."""


Runner = Callable[[], Awaitable[Sample]]


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (96, 80), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


async def run_streams(run: Runner, concurrency: int, streams: int) -> tuple[list[Sample], float]:
    """Run `streams` streams, `concurrency` at a time; the samples and the seconds taken."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one() -> Sample:
        async with semaphore:
            return await run()

    start = time.perf_counter()
    samples = await asyncio.gather(*(one() for _ in range(streams)))
    return list(samples), time.perf_counter() - start


async def measure(run: Runner, concurrency: int, streams: int) -> tuple[list[float], float]:
    """Run `streams` streams, `concurrency` at a time; TTFTs and tokens/s."""
    samples, elapsed = await run_streams(run, concurrency, streams)
    return [s.ttft_s for s in samples], sum(s.tokens for s in samples) / elapsed


def engine_runner(engine: Any, prompt_ids: list[int], image: Any, tokens: int) -> Runner:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    async def run() -> Sample:
        params = SamplingParams(
            max_tokens=tokens, temperature=0.0, output_kind=RequestOutputKind.DELTA
        )
        start = time.perf_counter()
        first = None
        count = 0
        prompt = {"prompt_token_ids": prompt_ids, "multi_modal_data": {"image": image}}
        async for out in engine.generate(prompt, params, uuid.uuid4().hex):
            # First visible text, as the other paths measure it (byte-level
            # tokens can end mid-character and carry no text yet).
            if first is None and out.outputs[0].text:
                first = time.perf_counter() - start
            count += len(out.outputs[0].token_ids)
        return Sample(first or 0.0, count)

    return run


def grpc_runner(
    port: int, png: bytes | None, tokens: int, metadata: tuple[tuple[str, str], ...]
) -> Runner:
    """Chats over gRPC: PROMPT with the image, or TEXT_PROMPT alone when png is None."""
    import grpc
    from dreamsight.common.v1 import common_pb2
    from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = vision_pb2_grpc.VisionServiceStub(channel)
    message = vision_pb2.Message(role=vision_pb2.ROLE_USER, content=TEXT_PROMPT)
    if png is not None:
        message = vision_pb2.Message(
            role=vision_pb2.ROLE_USER,
            content=PROMPT,
            images=[common_pb2.Image(data=png, mime_type="image/png")],
        )
    request = vision_pb2.ChatRequest(
        messages=[message], options=vision_pb2.ChatOptions(temperature=0.0, max_tokens=tokens)
    )

    async def run() -> Sample:
        start = time.perf_counter()
        first = None
        count = chunks = 0
        async for response in stub.Chat(request, metadata=metadata):
            if response.WhichOneof("event") == "delta":
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
            elif response.WhichOneof("event") == "final":
                count = response.final.completion_tokens
        return Sample(first or 0.0, count, chunks)

    return run


def openai_runner(port: int, png: bytes, tokens: int, model: str) -> Runner:
    import httpx

    client = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": PROMPT},
                ],
            }
        ],
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def run() -> Sample:
        start = time.perf_counter()
        first = None
        count = 0
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    count = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if first is None and choices and choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - start
        return Sample(first or 0.0, count)

    return run


async def wait_http(port: int, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("vLLM's OpenAI server exited")
            try:
                if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError("vllm serve did not become healthy")


async def wait_grpc(port: int, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("vision service exited")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError("vision service did not become healthy")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


PATHS = ("engine", "grpc", "gateway", "openai")


async def text_chats(
    runners: dict[str, Runner], rounds: int, chats: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Text chats 8 at once, the sides alternating; per side its TTFTs and the
    chunks/s of each run."""
    results: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in runners}
    names = list(runners)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            samples, elapsed = await run_streams(runners[name], 8, chats)
            results[name][0].extend(s.ttft_s for s in samples)
            results[name][1].append(sum(s.chunks for s in samples) / elapsed)
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=16, help="streams per measurement")
    parser.add_argument("--paths", default=",".join(PATHS), help="image paths to measure")
    parser.add_argument("--text-chats", type=int, default=96, help="text chats per run")
    parser.add_argument("--text-rounds", type=int, default=8, help="text runs per side")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    if not set(paths) <= set(PATHS):
        parser.error(f"--paths: choose among {', '.join(PATHS)}")

    from prometheus_client import CollectorRegistry

    from dreamsight_demo import llava as demo_model
    from dreamsight_server.images import ImageLimits, decode_image
    from dreamsight_server.metadata import GATEWAY_TOKEN_HEADER
    from vision_service.config import VisionSettings
    from vision_service.domain import ChatInput, ChatMessage, Role
    from vision_service.engine import VllmChatEngine
    from vision_service.metrics import VisionMetrics

    workdir = Path(tempfile.mkdtemp(prefix="bench-vision-"))
    model = args.model or demo_model.build(workdir / "llava-demo")
    common = ["--max-model-len", "1024", "--max-num-seqs", "16", "--enforce-eager"]
    common += ["--dtype", "float32"]
    grpc_port, openai_port = free_port(), free_port()
    gateway = GatewayProcess(workdir, grpc_port)
    logs = [open(workdir / f"{name}.log", "wb") for name in ("ours", "vllm")]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vision_service", "--model", str(model),
             "--served-model-name", "llava-demo", "--port", str(grpc_port),
             "--metrics-port", str(free_port()), *common],
            stdout=logs[0], stderr=subprocess.STDOUT, env={**os.environ, **gateway.backend_env},
        ),
    ]  # fmt: skip
    if "openai" in paths:
        procs.append(
            subprocess.Popen(
                # `vllm serve` looks up the "vllm" distribution, which vllm-cpu is not.
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                 "--model", str(model), "--port", str(openai_port),
                 "--served-model-name", "llava-demo", "--limit-mm-per-prompt", '{"image": 4}',
                 "--disable-log-stats", *common],
                stdout=logs[1], stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
    engine = None
    if "engine" in paths:
        settings = VisionSettings(
            model=str(model),
            max_model_len=1024,
            max_num_seqs=16,
            enforce_eager=True,
            dtype="float32",
        )
        engine = VllmChatEngine(settings, VisionMetrics(CollectorRegistry()))
    try:
        if engine is not None:
            await engine.start()
        await wait_grpc(grpc_port, procs[0])
        gateway.start()
        key = await asyncio.to_thread(gateway.serving)
        if "openai" in paths:
            await wait_http(openai_port, procs[1])
        png = _png()
        direct = ((GATEWAY_TOKEN_HEADER, gateway.secret),)  # the vision service's only caller
        bearer = (("authorization", f"Bearer {key}"),)
        runners: dict[str, Runner] = {}
        for name in paths:
            if name == "engine" and engine is not None:
                image = decode_image(png, ImageLimits(), "image")
                chat = ChatInput(
                    model="llava-demo", messages=(ChatMessage(Role.USER, PROMPT, (image,)),)
                )
                prompt_ids = engine.render_prompt(chat)
                runners[name] = engine_runner(engine.vllm, prompt_ids, image, args.tokens)
            elif name == "grpc":
                runners[name] = grpc_runner(grpc_port, png, args.tokens, direct)
            elif name == "gateway":
                runners[name] = grpc_runner(gateway.port, png, args.tokens, bearer)
            elif name == "openai":
                runners[name] = openai_runner(openai_port, png, args.tokens, "llava-demo")
        text_runners = {
            "direct": grpc_runner(grpc_port, None, args.text_tokens, direct),
            "gateway": grpc_runner(gateway.port, None, args.text_tokens, bearer),
        }
        for run in [*runners.values(), *text_runners.values()]:  # warm-up, both batch sizes
            await measure(run, 1, 2)
            await measure(run, 8, 16)
        results: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
        for _ in range(args.rounds):
            for concurrency in (1, 8):
                for name, run in runners.items():
                    ttfts, tps = await measure(run, concurrency, args.streams)
                    acc = results.setdefault((name, concurrency), ([], []))
                    acc[0].extend(ttfts)
                    acc[1].append(tps)
        text = await text_chats(text_runners, args.text_rounds, args.text_chats)
        print("with the image:")
        print(f"{'path':8} {'conc':>4} {'ttft_p50_ms':>12} {'ttft_p95_ms':>12} {'tokens/s':>10}")
        summary: dict[tuple[str, int], tuple[float, float]] = {}
        for (name, concurrency), (ttfts, tps_list) in sorted(results.items()):
            p50, p95 = pct(ttfts, 0.5) * 1e3, pct(ttfts, 0.95) * 1e3
            tps = statistics.median(tps_list)
            summary[(name, concurrency)] = (p50, tps)
            print(f"{name:8} {concurrency:>4} {p50:>12.2f} {p95:>12.2f} {tps:>10.1f}")
        print(
            f"\ntext chats ({args.text_chats} per run, 8 at once, up to {args.text_tokens} tokens):"
        )
        print(f"{'path':8} {'ttft_p50_ms':>12} {'ttft_p95_ms':>12} {'chunks/s per run':>30}")
        for name, (ttfts, rates) in text.items():
            runs = " ".join(f"{r:.0f}" for r in rates)
            p50, p95 = pct(ttfts, 0.5) * 1e3, pct(ttfts, 0.95) * 1e3
            print(f"{name:8} {p50:>12.2f} {p95:>12.2f} {runs:>30}")
        ratios = [g / d for d, g in zip(text["direct"][1], text["gateway"][1], strict=True)]
        print(
            "text chunks/s ratio per run (gateway / direct): "
            + " ".join(f"{r:.3f}" for r in ratios)
        )
        line: list[str] = []
        if "grpc" in paths and "engine" in paths:
            added = summary[("grpc", 1)][0] - summary[("engine", 1)][0]
            vs_engine = summary[("grpc", 8)][1] / summary[("engine", 8)][1]
            line += [f"ttft_p50_added_ms={added:.2f}", f"throughput_vs_engine={vs_engine:.3f}"]
        if "grpc" in paths and "openai" in paths:
            vs_openai = summary[("grpc", 8)][1] / summary[("openai", 8)][1]
            line.append(f"throughput_vs_vllm_openai={vs_openai:.3f}")
        if "grpc" in paths and "gateway" in paths:
            via_gateway = summary[("gateway", 8)][1] / summary[("grpc", 8)][1]
            gateway_added = summary[("gateway", 1)][0] - summary[("grpc", 1)][0]
            line += [
                f"gateway_throughput_vs_direct={via_gateway:.3f}",
                f"gateway_ttft_p50_added_ms={gateway_added:.2f}",
            ]
        direct_p50, gateway_p50 = (pct(text[n][0], 0.5) * 1e3 for n in ("direct", "gateway"))
        line += [
            f"text_chunks_ratio={statistics.median(ratios):.3f}",
            f"text_ttft_p50_ms={direct_p50:.1f}/{gateway_p50:.1f}",
        ]
        print(f"(logs in {workdir})")
        print("bench vision: " + " ".join(line))
    finally:
        gateway.stop()
        if engine is not None:
            engine.shutdown()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
        for log in logs:
            log.close()


if __name__ == "__main__":
    asyncio.run(main())
