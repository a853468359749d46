"""Session-wide fixtures: the demo models are built once per test session."""

from __future__ import annotations

import os

from dreamsight_server import grpc_core

# The servers the tests start in process run gRPC's core as the services do.
grpc_core.configure()

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import pytest  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from dreamsight_server.images import ImageLimits  # noqa: E402
from dreamsight_server.lifecycle import ServerOptions  # noqa: E402

# vLLM on CPU needs an explicit KV-cache size (GiB); keep it small here.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo LLaVA-Llama-3, built once."""
    from dreamsight_demo import llava as demo_model

    return demo_model.build(tmp_path_factory.mktemp("models") / "llava-demo")


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo Stable Diffusion pipeline, built once."""
    from dreamsight_demo import sd as demo_model

    return demo_model.build(tmp_path_factory.mktemp("models") / "sd-demo")


@pytest.fixture(scope="session")
async def vision(llava_dir: Path) -> Any:
    """One real vision service (vLLM on the demo LLaVA) for the whole session.

    Health is recorded before and after loading, so the transition can be
    asserted without a second engine.
    """
    from vision_service.config import VisionSettings
    from vision_service.server import start_service

    settings = VisionSettings(
        model=str(llava_dir),
        served_model_name="llava-demo",
        max_model_len=1024,
        max_images_per_request=3,
        max_num_seqs=8,
        enforce_eager=True,
        dtype="float32",
        default_max_tokens=16,
        # The demo model pads free-whitespace JSON with whitespace tokens.
        compact_json=True,
        images=ImageLimits(max_bytes=200_000, max_pixels=1024 * 1024),
        server=ServerOptions(grace_s=2.0),
    )
    service = await start_service(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    health = health_pb2_grpc.HealthStub(channel)
    before = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
    await service.load()
    after = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
    handle = VisionHandle(
        service=service, channel=channel, health_before=before, health_after=after
    )
    yield handle
    await channel.close(grace=None)
    await service.stop(grace_s=1.0)


@pytest.fixture(scope="session")
async def diffusion_backend(sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real diffusion service (diffusers on the demo pipeline) for the tests
    that put a gateway or scrape metrics in front of it; the diffusion and
    DreamBooth tests start their own, with the settings they test."""
    from diffusion_service.config import BaseModel, DiffusionSettings, Limits, TrainingSettings
    from diffusion_service.server import start_service as start_diffusion

    training = tmp_path_factory.mktemp("diffusion-backend")
    settings = DiffusionSettings(
        models=(BaseModel("sd-demo", str(sd_dir)),),
        max_loaded_models=1,
        concurrency=1,
        max_queue=4,
        torch_threads=1,
        device="cpu",
        limits=Limits(min_size=64, max_size=128, default_steps=2, max_images=3),
        training=TrainingSettings(store=training / "jobs.sqlite3", artifacts_dir=training),
        server=ServerOptions(grace_s=2.0),
    )
    service = await start_diffusion(settings)
    await service.load()
    yield service
    await service.stop(grace_s=1.0)


@dataclass
class VisionHandle:
    """What tests get: the running service, a channel to it, health history."""

    service: Any
    channel: grpc.aio.Channel
    health_before: int
    health_after: int
