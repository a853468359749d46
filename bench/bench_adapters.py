"""LoRA adapters vs full tunes on one diffusion service, side by side.

    python bench/bench_adapters.py [--model-dir DIR] [--train-steps N] [--steps N]
        [--size PX] [--cold-runs N] [--images N] [--threads N]

On the demo model (default) or any Stable Diffusion directory, in one run:

(a) disk: a LoRA job and a full job (each with the service's default
    settings of its kind: rank 4 on to_k/to_q/to_v/to_out.0; every UNet
    weight) are trained for ``--train-steps`` steps by the real trainer and
    their exports measured on disk;
(b) cold first image: a real diffusion service (gRPC on 127.0.0.1, the base
    model loaded) gets a freshly registered model that is not loaded and
    draws one image; an adapter (loaded onto the base pipeline) against a
    full tune (a pipeline of its own), ``--cold-runs`` of each, alternating,
    each on a copy never used before; medians;
(c) rotation: ``--images`` images while requests rotate over 8 tenants'
    adapters (each already loaded once) against as many on the base alone,
    one request at a time, alternating in blocks; time per image;
(d) misses: the base pipeline's adapter cache (diffusion_service.adapters)
    holding 4 while 12 tenants' adapters rotate, so that every use loads
    one: a hot swap into the least recently used adapter's layers against
    deleting it and loading afresh, alternating in blocks; time per miss.

Last line: ``bench adapters: adapter_mb=X full_mb=Y cold_first_image_ratio=C
rotate_8_ratio=R`` (C = adapter cold time / full cold time; R = rotating
time per image / base-alone time per image).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TENANTS = 8


class _Quiet:
    cancelled = False
    shutting_down = False

    def emit(self, event: Any) -> None:
        pass


def photo(index: int, size: int = 64) -> bytes:
    """A synthetic instance photo: a colored disc on a gradient."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 96)], axis=-1)
    pixels[(x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2] = rng.integers(0, 255, 3)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def train(model_dir: Path, work: Path, kind: str, steps: int) -> Path:
    """One job of that kind with the packaged defaults; returns its export."""
    from diffusion_service.dreambooth.params import (
        JobParams,
        WorkerRuntime,
        WorkerSpec,
        load_defaults,
    )
    from diffusion_service.dreambooth.trainer import run_job

    d = load_defaults()
    job_dir = work / f"job-{kind}"
    instance = job_dir / "instance"
    instance.mkdir(parents=True)
    for i in range(3):
        (instance / f"{i}.png").write_bytes(photo(i))
    lora = kind == "lora"
    params = JobParams(
        base_model="sd-demo",
        instance_prompt="a photo of sks dog",
        class_prompt="",
        validation_prompt="",
        num_class_images=0,
        prior_loss_weight=1.0,
        max_train_steps=steps,
        learning_rate=d.lora.learning_rate if lora else d.learning_rate,
        train_text_encoder=False,
        resolution=32,
        seed=0,
        checkpoint_interval=1000,
        num_instance_images=3,
        kind=kind,
        rank=d.lora.rank if lora else 0,
        lora_alpha=float(d.lora.rank) if lora else 0.0,
        lora_layers=d.lora.lora_layers if lora else (),
        trainer=d.trainer,
        class_images=d.class_images,
        validation=d.validation,
    )
    runtime = WorkerRuntime(
        job_id="b" * 22,
        base_source=str(model_dir),
        instance_dir=str(instance),
        class_cache_dir=str(work / "class-images"),
        export_dir=str(job_dir / "export"),
        accelerator="cpu",
    )
    assert run_job(WorkerSpec(params, runtime), job_dir, _Quiet(), _Quiet()) == "exported"
    return job_dir / "export"


def misses(model_dir: Path, lora: Path, work: Path, rounds: int = 4) -> tuple[float, float]:
    """Milliseconds per adapter cache miss, median: hot swap, then fresh load."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from diffusion_service.adapters import AdapterRef, AdapterSlots
    from diffusion_service.tunes import LORA_WEIGHTS

    tensors = load_file(str(lora / LORA_WEIGHTS))
    with safe_open(str(lora / LORA_WEIGHTS), "pt") as f:  # the LoRA config is in its metadata
        metadata = f.metadata()
    refs = []
    for i in range(12):  # 12 tenants' adapters: the same shapes, other weights
        out = work / f"tenant-{i}"
        out.mkdir(parents=True)
        scaled = {k: v * (1 + i / 10) if "lora_B" in k else v for k, v in tensors.items()}
        save_file(scaled, str(out / LORA_WEIGHTS), metadata=metadata)
        refs.append(AdapterRef(str(out), (out / LORA_WEIGHTS).stat().st_size))
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for hotswap in (True, False):
            pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
            loads: list[str] = []
            slots = AdapterSlots(
                pipe, max_count=4, max_bytes=2**30, on_load=loads.append, hotswap=hotswap
            )
            for ref in refs[:4]:  # fill the cache
                with slots.use(ref):
                    pass
            for ref in refs[4:] + refs[:4]:  # then every use is a miss
                started = time.perf_counter()
                with slots.use(ref):
                    pass
                times[hotswap].append(time.perf_counter() - started)
            assert ("hot_swap" in loads) == hotswap
    return 1000 * statistics.median(times[True]), 1000 * statistics.median(times[False])


def megabytes(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 1e6


async def measure(args: argparse.Namespace, model_dir: Path, work: Path) -> None:
    import grpc
    from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc

    from diffusion_service.config import BaseModel, DiffusionSettings, Limits, TrainingSettings
    from diffusion_service.server import start_service
    from dreamsight_server.lifecycle import ServerOptions

    lora = train(model_dir, work, "lora", args.train_steps)
    full = train(model_dir, work, "full", args.train_steps)
    adapter_mb, full_mb = megabytes(lora), megabytes(full)
    print(f"(a) disk: adapter {adapter_mb:.4f} MB, full tune {full_mb:.4f} MB "
          f"({100 * adapter_mb / full_mb:.2f}%)")  # fmt: skip

    settings = DiffusionSettings(
        models=(BaseModel("sd-demo", str(model_dir)),),
        max_loaded_models=2,
        max_loaded_adapters=TENANTS + 2,
        concurrency=1,
        torch_threads=args.threads,
        device="cpu",
        limits=Limits(default_steps=args.steps),
        training=TrainingSettings(
            store=work / "jobs.sqlite3", artifacts_dir=work / "artifacts", concurrency=0
        ),
        trust_any_caller=True,
        server=ServerOptions(grace_s=1.0, metrics_port=0),
    )
    service = await start_service(settings)
    await service.load()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
    copies = work / "copies"
    size = args.size

    async def register(source: Path, name: str, who: str) -> None:
        target = shutil.copytree(source, copies / f"{who}-{name}")
        await asyncio.to_thread(
            service.engine.register_fine_tuned, name, target, who, "sd-demo", f"job-{who}-{name}"
        )

    async def draw(model: str, who: str, seed: int = 1) -> float:
        request = diffusion_pb2.GenerateRequest(
            model=model, prompt="a photo of sks dog", seed=seed, width=size, height=size
        )
        started = time.perf_counter()
        async for response in stub.Generate(request, metadata=(("x-dreamsight-tenant", who),)):
            if response.WhichOneof("event") == "result":
                return time.perf_counter() - started
        raise RuntimeError("no result")

    try:
        await draw("sd-demo", "warm")  # the base is loaded and warm
        cold: dict[str, list[float]] = {"adapter": [], "full": []}
        overhead: dict[str, list[float]] = {"adapter": [], "full": []}
        for run in range(args.cold_runs):
            order = ("adapter", "full") if run % 2 == 0 else ("full", "adapter")
            for which in order:
                who = f"cold-{which}-{run}"
                await register(lora if which == "adapter" else full, "tune", who)
                first = await draw("tune", who)
                cold[which].append(first)
                # The same image again, now loaded: what the cold start added.
                overhead[which].append(first - await draw("tune", who))
        cold_adapter = statistics.median(cold["adapter"])
        cold_full = statistics.median(cold["full"])
        load_adapter = statistics.median(overhead["adapter"])
        load_full = statistics.median(overhead["full"])
        print(f"(b) cold first image: adapter {cold_adapter:.3f} s, full tune {cold_full:.3f} s; "
              f"over a warm image of the same model: adapter +{load_adapter:.3f} s, full tune "
              f"+{load_full:.3f} s")  # fmt: skip

        tenants = [f"tenant-{i}" for i in range(TENANTS)]
        for who in tenants:
            await register(lora, "mine", who)
            await draw("mine", who)
        rotating: list[float] = []
        alone: list[float] = []
        block = TENANTS
        for start in range(0, args.images, block):
            count = min(block, args.images - start)
            for i in range(count):
                rotating.append(await draw("mine", tenants[i % TENANTS], seed=start + i))
            for i in range(count):
                alone.append(await draw("sd-demo", "base", seed=start + i))
        per_rotating, per_alone = statistics.median(rotating), statistics.median(alone)
        switches = sum(m.adapters.switches for m in service.engine._cache.models())
        print(f"(c) {args.images} images: rotating over {TENANTS} adapters "
              f"{per_rotating:.4f} s/image, base alone {per_alone:.4f} s/image; "
              f"{switches} adapter switches")  # fmt: skip
        swap_ms, fresh_ms = await asyncio.to_thread(misses, model_dir, lora, work / "misses")
        print(f"(d) misses, 12 adapters through a cache of 4: hot swap {swap_ms:.1f} ms, "
              f"delete and load afresh {fresh_ms:.1f} ms per miss "
              f"({swap_ms / fresh_ms:.2f})")  # fmt: skip
        print(
            f"bench adapters: adapter_mb={adapter_mb:.4f} full_mb={full_mb:.4f} "
            f"cold_first_image_ratio={cold_adapter / cold_full:.3f} "
            f"rotate_8_ratio={per_rotating / per_alone:.3f}"
        )
    finally:
        await channel.close(None)
        await service.stop(grace_s=1.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="", help="a diffusers SD directory (default: the demo)")
    p.add_argument("--train-steps", type=int, default=2, help="steps of each training job")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    p.add_argument("--size", type=int, default=64, help="image width and height (pixels)")
    p.add_argument("--cold-runs", type=int, default=3, help="cold first images of each kind")
    p.add_argument("--images", type=int, default=32, help="images of each side in (c)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = Path(args.model_dir) if args.model_dir else None
        if model_dir is None:
            from dreamsight_demo import sd as demo_model

            model_dir = demo_model.build(work / "sd-demo")
        print(f"model {model_dir}, {args.steps} denoising steps at {args.size}px, "
              f"{args.threads} thread(s)")  # fmt: skip
        asyncio.run(measure(args, model_dir, work))


if __name__ == "__main__":
    main()
