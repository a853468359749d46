"""Check the diffusion service's CUDA path on a GPU machine, against its CPU path.

    python -m dreamsight_demo.cuda_check [--images N] [--devices cuda,cpu] [--no-train] [--out FILE]

In one run, the diffusion service on the trained demo model (models/sd-shapes)
behind the real gateway, called with the public async client, first on CUDA
(float16, as ``--dtype auto`` picks there) and then on CPU (float32):

- the latency of one 20-step image on each (median of five, after a warm-up),
  and the CPU/CUDA ratio;
- the judged colour and shape accuracy of the images each one draws
  (half precision must not break what the model knows);
- on CUDA only, the DreamBooth subject job the quality tests run (Lightning
  with mixed precision): seconds per step, and the subject fidelity after it.

Prints one JSON object. CI has no GPU and does not run this; a GPU session
does (docs/quality.md records what it printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dreamsight
import torch

from diffusion_service.config import BaseModel, DiffusionSettings, TrainingSettings
from diffusion_service.server import start_service
from dreamsight_demo.shapes import quality, scenes
from dreamsight_demo.weights import COMMITTED_ROOT
from dreamsight_server.lifecycle import ServerOptions
from gateway.config import GatewaySettings
from gateway.server import start_gateway

STEPS = 20


def _unused_port() -> int:
    """A loopback port nothing listens on (the gateway's vision target here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def measure(device: str, tmp: Path, images: int, train: bool) -> dict[str, Any]:
    """Start diffusion and the gateway on one device and measure through the client."""
    diffusion = await start_service(
        DiffusionSettings(
            models=(BaseModel("sd-shapes", str(COMMITTED_ROOT / "sd-shapes")),),
            device=device,
            training=TrainingSettings(
                store=tmp / f"{device}-jobs.sqlite3",
                artifacts_dir=tmp / f"{device}-training",
                accelerator="gpu" if device == "cuda" else "cpu",
                stop_grace_s=5.0,
            ),
            server=ServerOptions(metrics_port=None, grace_s=1.0),
        )
    )
    await diffusion.load()
    gateway = await start_gateway(
        GatewaySettings(
            vision_target=f"127.0.0.1:{_unused_port()}",
            diffusion_target=f"127.0.0.1:{diffusion.port}",
            database=str(tmp / f"{device}-gateway.sqlite3"),
            http_port=None,
            server=ServerOptions(metrics_port=None, grace_s=1.0),
        )
    )
    _, key = await gateway.core.keys.create("cuda-check", "max", "cuda check")
    out: dict[str, Any] = {"device": device}
    try:
        async with dreamsight.AsyncClient(f"127.0.0.1:{gateway.port}", api_key=key) as client:
            await client.generate_image("a red circle", steps=STEPS, seed=0)  # warm-up
            latencies, gpu_seconds = [], []
            for seed in range(5):
                started = time.perf_counter()
                result = await client.generate_image("a blue triangle", steps=STEPS, seed=seed)
                latencies.append(time.perf_counter() - started)
                gpu_seconds.append(result.gpu_seconds)
            out["latency_s_20_steps"] = round(statistics.median(latencies), 4)
            out["gpu_seconds_per_image"] = round(statistics.median(gpu_seconds), 4)
            drawn = await quality.draw(
                client, quality.BASE_PROMPTS, per_prompt=images, steps=STEPS, seed=100
            )
            out["judged"] = {k: round(v, 3) for k, v in quality.draw_accuracy(drawn).items()}
            out["judged_images"] = len(drawn)
            print(json.dumps(out), file=sys.stderr, flush=True)
            if train:
                out["dreambooth"] = await dreambooth(client, images)
    finally:
        await gateway.stop(0)
        await diffusion.stop(0)
    return out


async def dreambooth(client: dreamsight.AsyncClient, images: int) -> dict[str, Any]:
    """The quality tests' subject job; seconds per step and fidelity after."""
    photos = [quality.png(p) for p in scenes.subject_images(seed=0, count=4)]
    started = time.perf_counter()
    job = await client.train(
        photos,
        quality.SUBJECT_PROMPT,
        class_prompt=quality.CLASS_PROMPT,
        output_model_name="sks-star-cuda",
        **quality.DREAMBOOTH.train_kwargs(),
    )
    first_step: float | None = None
    last_step = 0.0
    async for event in job.watch():
        if event.kind == "training_step":
            now = time.perf_counter()
            first_step = first_step if first_step is not None else now
            last_step = now
    final = await job.refresh()
    wall = time.perf_counter() - started
    steps = quality.DREAMBOOTH.max_train_steps
    result: dict[str, Any] = {"state": final.state, "reason": final.reason, "wall_s": round(wall)}
    if first_step is not None and steps > 1:
        result["s_per_step"] = round((last_step - first_step) / (steps - 1), 4)
    if final.state == "succeeded":
        after = await quality.draw(
            client, quality.subject_prompts(), per_prompt=images, model=final.model, seed=300
        )
        result["subject_fidelity"] = round(quality.draw_accuracy(after)["both"], 3)
        result["gpu_seconds"] = round(final.gpu_seconds, 2)
    return result


async def run(devices: list[str], images: int, train: bool) -> dict[str, Any]:
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch")
    report: dict[str, Any] = {"torch": torch.__version__}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            count = images if device == "cuda" else max(1, images // 4)
            report[device] = await measure(device, Path(tmp), count, train and device == "cuda")
    if "cuda" in report and "cpu" in report:
        report["cpu_over_cuda_latency"] = round(
            report["cpu"]["latency_s_20_steps"] / report["cuda"]["latency_s_20_steps"], 2
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="images per base prompt on CUDA")
    parser.add_argument("--devices", default="cuda,cpu", help="in this order (default cuda,cpu)")
    parser.add_argument("--no-train", action="store_true", help="skip the DreamBooth job")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    report = asyncio.run(run(args.devices.split(","), args.images, not args.no_train))
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
