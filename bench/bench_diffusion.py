"""Diffusion benchmark: diffusers called directly vs our gRPC service.

    python bench/bench_diffusion.py [--rounds N] [--steps N]

Same tiny demo Stable Diffusion (built into a temporary directory), prompt,
size, steps, guidance and seeds, in one run, one torch thread each:

(a) ``StableDiffusionPipeline`` called directly in this process by one
    worker thread, each image encoded to PNG (what the service returns);
(b) our DiffusionService as its own process (``python -m diffusion_service
    --concurrency 1 --torch-threads 1``), called over gRPC on loopback
    (validation, queueing, per-request scheduler, progress events, metering
    and metrics included).

Both serve one request at a time, so at 4 concurrent requests the others
wait in line (in an executor queue for (a), in the service's queue for (b)).
Rounds alternate a/b and b/a so drift on the shared cores hits both alike.
Reports images/s and p50 latency at 1 and 4 concurrent requests; the last
line is ``bench diffusion: overhead_ratio=X``, the service's p50 latency over
the direct call's at 1 request and ``--steps`` (default 25) steps.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT = "a photo of a red dog on the beach"
GUIDANCE = 7.5
SIZE = 64
LEVELS = (1, 4)

# Runs `count` requests, `concurrency` submitted at once; returns each latency
# and the wall time of the whole batch.
Side = Callable[[int, int, int], Awaitable[tuple[list[float], float]]]


@dataclass
class Figures:
    """Latencies and throughput of one side at one concurrency level."""

    latencies: list[float]
    images: int = 0
    wall_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)


class Direct:
    """diffusers in this process, one worker thread, one torch thread."""

    def __init__(self, model_dir: Path, steps: int) -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        torch.set_num_threads(1)
        self._torch = torch
        self._steps = steps
        self._pipe = StableDiffusionPipeline.from_pretrained(str(model_dir))
        self._pipe.set_progress_bar_config(disable=True)
        self._worker = ThreadPoolExecutor(
            max_workers=1, initializer=torch.set_num_threads, initargs=(1,)
        )

    def one(self, seed: int) -> bytes:
        generator = self._torch.Generator("cpu").manual_seed(seed)
        image = self._pipe(
            PROMPT,
            height=SIZE,
            width=SIZE,
            num_inference_steps=self._steps,
            guidance_scale=GUIDANCE,
            generator=generator,
        ).images[0]
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()

    async def run(self, count: int, concurrency: int, seed: int) -> tuple[list[float], float]:
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        started = time.perf_counter()
        for first in range(0, count, concurrency):
            batch = range(first, min(count, first + concurrency))

            async def timed(i: int) -> None:
                t0 = time.perf_counter()
                await loop.run_in_executor(self._worker, self.one, seed + i)
                latencies.append(time.perf_counter() - t0)

            await asyncio.gather(*(timed(i) for i in batch))
        return latencies, time.perf_counter() - started

    def close(self) -> None:
        self._worker.shutdown()


class Service:
    """Our service in its own process, called over gRPC."""

    def __init__(self, model_dir: Path, steps: int) -> None:
        self._steps = steps
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "diffusion_service",
                f"--model=sd-demo={model_dir}",
                "--port=0",
                "--metrics-port=0",
                "--concurrency=1",
                "--max-queue=16",
                "--torch-threads=1",
                "--device=cpu",
                "--grace-seconds=2",
                "--trust-any-caller",  # the benchmark calls it directly, as its peer
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.port = self._wait_for_port()
        self._channel: Any = None

    def _wait_for_port(self) -> int:
        assert self._proc.stderr is not None
        lines: list[str] = []
        for line in self._proc.stderr:
            lines.append(line)
            match = re.search(r"diffusion listening on [\d.]+:(\d+)", line)
            if match:
                threading.Thread(target=self._drain, daemon=True).start()
                return int(match.group(1))
        raise RuntimeError("service exited before listening:\n" + "".join(lines[-30:]))

    def _drain(self) -> None:
        for _ in self._proc.stderr or ():
            pass

    async def wait_serving(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        health = health_pb2_grpc.HealthStub(self._channel)
        for _ in range(1200):
            status = (await health.Check(health_pb2.HealthCheckRequest())).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("the service never became SERVING")

    async def one(self, seed: int) -> bytes:
        from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc

        stub = diffusion_pb2_grpc.DiffusionServiceStub(self._channel)
        request = diffusion_pb2.GenerateRequest(
            prompt=PROMPT,
            width=SIZE,
            height=SIZE,
            steps=self._steps,
            guidance_scale=GUIDANCE,
            seed=seed,
        )
        async for response in stub.Generate(request):
            if response.WhichOneof("event") == "result":
                return bytes(response.result.images[0].image.data)
        raise RuntimeError("the stream ended without a result")

    async def run(self, count: int, concurrency: int, seed: int) -> tuple[list[float], float]:
        latencies: list[float] = []
        started = time.perf_counter()
        for first in range(0, count, concurrency):
            batch = range(first, min(count, first + concurrency))

            async def timed(i: int) -> None:
                t0 = time.perf_counter()
                await self.one(seed + i)
                latencies.append(time.perf_counter() - t0)

            await asyncio.gather(*(timed(i) for i in batch))
        return latencies, time.perf_counter() - started

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
        self._proc.terminate()
        self._proc.wait(timeout=60)


async def main_async(args: argparse.Namespace) -> None:
    from dreamsight_demo import sd as demo_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = demo_model.build(Path(tmp) / "sd-demo")
        service = Service(model_dir, args.steps)
        direct = Direct(model_dir, args.steps)
        try:
            await service.wait_serving()
            loop = asyncio.get_running_loop()
            # Warm both sides; the same seed must give the same picture.
            same = await loop.run_in_executor(None, direct.one, 1) == await service.one(1)
            print(f"warm-up done; identical PNG for the same seed: {'yes' if same else 'no'}")
            sides: dict[str, Side] = {"direct": direct.run, "service": service.run}
            figures = {(s, n): Figures([]) for s in sides for n in LEVELS}
            for round_ in range(args.rounds):
                order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
                for level in LEVELS:
                    count = args.requests if level == 1 else level * args.waves
                    for side in order:
                        latencies, wall = await sides[side](count, level, 100 * round_)
                        fig = figures[(side, level)]
                        fig.latencies += latencies
                        fig.images += count
                        fig.wall_s += wall
                        print(
                            f"round {round_ + 1} {side:>7} x{level}: "
                            f"p50 {statistics.median(latencies):.3f}s, "
                            f"{count / wall:.3f} images/s",
                            flush=True,
                        )
        finally:
            direct.close()
            await service.close()
    print(f"\n| steps={args.steps}, {SIZE}x{SIZE}, guidance {GUIDANCE} | images/s | p50 latency |")
    print("|---|---|---|")
    for level in LEVELS:
        for side in ("direct", "service"):
            fig = figures[(side, level)]
            print(f"| {side}, {level} at once | {fig.images_per_s:.3f} | {fig.p50:.3f} s |")
    for level in LEVELS:
        d, s = figures[("direct", level)], figures[("service", level)]
        print(
            f"x{level}: latency ratio {s.p50 / d.p50:.3f}, "
            f"throughput ratio {s.images_per_s / d.images_per_s:.3f}"
        )
    ratio = figures[("service", 1)].p50 / figures[("direct", 1)].p50
    print(f"bench diffusion: overhead_ratio={ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="a/b rounds (default 2)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument(
        "--requests", type=int, default=3, help="sequential requests per round at 1 (default 3)"
    )
    parser.add_argument(
        "--waves", type=int, default=1, help="waves of 4 requests per round at 4 (default 1)"
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
