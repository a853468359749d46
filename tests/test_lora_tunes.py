"""LoRA and full tunes (issue 19): training both kinds with class priors,
checkpoints and resume; the exports (diffusers' LoRA format, a full tune's
changed parts); adapters served per request on one loaded base pipeline.

The trainer runs in this process (real Lightning, real peft) on the tiny demo
Stable Diffusion at 32x32 for two steps, then resumes for a third; the
serving tests run a real diffusion service over gRPC on 127.0.0.1 port 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from PIL import Image

from diffusion_service.config import BaseModel, DiffusionSettings, Limits, TrainingSettings
from diffusion_service.dreambooth.params import (
    DrawSettings,
    JobParams,
    TrainerOptions,
    WorkerRuntime,
    WorkerSpec,
)
from diffusion_service.jobs.worker_events import (
    CheckpointWritten,
    ClassImagesDrawn,
    StepFinished,
    TrainingBegan,
    WorkerEvent,
)
from diffusion_service.server import DiffusionService, start_service
from dreamsight_demo.weights import COMMITTED_ROOT
from dreamsight_server.lifecycle import ServerOptions
from tests.test_dreambooth import PHOTOS, tenant

pytestmark = pytest.mark.slow

LORA_FILE = "pytorch_lora_weights.safetensors"
PROMPT = "a photo of sks dog"


class Recorder:
    def __init__(self) -> None:
        self.items: list[WorkerEvent] = []

    def emit(self, event: WorkerEvent) -> None:
        self.items.append(event)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.items if isinstance(e, kind)]


class NoStop:
    cancelled = False
    shutting_down = False


def params(kind: str, steps: int) -> JobParams:
    lora = kind == "lora"
    return JobParams(
        base_model="sd-demo",
        instance_prompt=PROMPT,
        class_prompt="a photo of a dog",
        validation_prompt="",
        num_class_images=2,
        prior_loss_weight=0.5,
        max_train_steps=steps,
        # High for two steps, so the tune visibly changes the image.
        learning_rate=5e-3 if lora else 1e-4,
        train_text_encoder=not lora,
        resolution=32,
        seed=0,
        checkpoint_interval=1,
        num_instance_images=len(PHOTOS),
        kind=kind,
        rank=4 if lora else 0,
        lora_alpha=4.0 if lora else 0.0,
        lora_layers=("to_k", "to_q", "to_v", "to_out.0") if lora else (),
        train_text_encoder_lora=lora,
        trainer=TrainerOptions(lr_warmup_steps=0, keep_checkpoints=2),
        class_images=DrawSettings(batch_size=2, inference_steps=2),
        validation=DrawSettings(),
    )


@dataclass
class Trained:
    kind: str
    job_dir: Path
    export: Path
    first: Recorder
    resumed: Recorder


def train(sd_dir: Path, root: Path, kind: str) -> Trained:
    from diffusion_service.dreambooth.trainer import run_job

    job_dir = root / kind
    instance = job_dir / "instance"
    instance.mkdir(parents=True)
    for i, photo in enumerate(PHOTOS):
        (instance / f"{i}.png").write_bytes(photo.data)
    runtime = WorkerRuntime(
        job_id="j" * 22,
        base_source=str(sd_dir),
        instance_dir=str(instance),
        class_cache_dir=str(root / "class-images"),
        export_dir=str(job_dir / "export"),
        accelerator="cpu",
    )
    first, resumed = Recorder(), Recorder()
    assert run_job(WorkerSpec(params(kind, 2), runtime), job_dir, first, NoStop()) == "exported"
    # The same job asked for one more step: it resumes from its checkpoint.
    assert run_job(WorkerSpec(params(kind, 3), runtime), job_dir, resumed, NoStop()) == "exported"
    return Trained(kind, job_dir, job_dir / "export", first, resumed)


@pytest.fixture(scope="module")
def trained(sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trained]:
    root = tmp_path_factory.mktemp("tunes")
    return {kind: train(sd_dir, root, kind) for kind in ("lora", "full")}


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_both_kinds_train_with_priors_checkpoint_and_resume(
    trained: dict[str, Trained], kind: str
) -> None:
    import torch

    t = trained[kind]
    drawn = t.first.of(ClassImagesDrawn)
    assert drawn and (drawn[-1].done, drawn[-1].total) == (2, 2), "class priors drawn"
    assert [(e.done, e.total) for e in t.resumed.of(ClassImagesDrawn)] == [(2, 2)], "cached"
    assert [e.step for e in t.first.of(StepFinished)] == [1, 2]
    assert [e.step for e in t.first.of(CheckpointWritten)] == [1, 2]
    assert [e.step for e in t.resumed.of(TrainingBegan)] == [2], "resumed at step 2"
    assert [e.step for e in t.resumed.of(StepFinished)] == [3]
    assert all(e.loss is not None and e.loss > 0 for e in t.first.of(StepFinished))
    state = torch.load(t.job_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    if kind == "lora":
        # Only the adapters are trained and checkpointed, UNet's and text encoder's.
        assert state and all(".lora_A." in k or ".lora_B." in k for k in state), list(state)[:3]
        assert any(k.startswith("text_encoder.") for k in state)
    else:
        assert any(k.startswith("unet.") for k in state)
        assert any(k.startswith("text_encoder.") for k in state), "train_text_encoder"
        assert not any(".lora_" in k for k in state)
    assert not any(k.startswith("vae.") for k in state), "the frozen VAE is never saved"


def test_lora_trains_only_adapters_and_adds_the_prior_loss(sd_dir: Path) -> None:
    from tests.test_dreambooth import build_module

    module, batch = build_module(sd_dir, params("lora", 2))
    trainable = module.trainable_parameters()
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in names)
    total = sum(p.numel() for p in module.unet.parameters())
    assert sum(p.numel() for p in trainable) < total / 10, "adapters are a small fraction"
    losses = module.losses(batch)
    assert set(losses) == {"loss", "instance_loss", "prior_loss"}
    expected = losses["instance_loss"] + 0.5 * losses["prior_loss"]
    assert float(losses["loss"]) == pytest.approx(float(expected))


def test_exports_hold_only_what_changed(trained: dict[str, Trained], sd_dir: Path) -> None:
    from safetensors import safe_open

    lora = trained["lora"].export
    assert sorted(p.name for p in lora.iterdir()) == ["dreamsight_tune.json", LORA_FILE]
    with safe_open(str(lora / LORA_FILE), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
    assert any(k.startswith("unet.") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys)
    assert "lora_adapter_metadata" in metadata, "peft configs travel with the weights"
    manifest = json.loads((lora / "dreamsight_tune.json").read_text())
    assert (manifest["kind"], manifest["rank"], manifest["base_model"]) == ("lora", 4, "sd-demo")

    full = trained["full"].export
    assert sorted(p.name for p in full.iterdir()) == [
        "dreamsight_tune.json",
        "text_encoder",
        "unet",
    ]
    assert json.loads((full / "dreamsight_tune.json").read_text())["parts"] == [
        "unet",
        "text_encoder",
    ]
    size = sum(p.stat().st_size for p in lora.rglob("*") if p.is_file())
    full_size = sum(p.stat().st_size for p in full.rglob("*") if p.is_file())
    assert size < full_size * 0.05


def test_a_lora_export_keeps_every_adapter_it_trained(tmp_path: Path) -> None:
    """Adapters on attention and on convolutions together, on the shapes model
    (whose first block has no attention): diffusers' loader reads a file in
    one key format, chosen by its first key, so a file that mixed the old
    diffusers attention names with peft's lost the attention adapters."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    from diffusion_service.dreambooth.trainer import _export_lora
    from tests.test_dreambooth import build_module

    shapes = COMMITTED_ROOT / "sd-shapes"
    mixed = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv")
    module, _ = build_module(shapes, dataclasses.replace(params("lora", 2), lora_layers=mixed))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_B." in name:
                p.add_(0.05 * torch.randn_like(p))
    _export_lora(module, tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(str(shapes), safety_checker=None)
    pipe.load_lora_weights(str(tmp_path))

    def adapted(unet: Any) -> set[str]:
        return {n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}

    assert adapted(pipe.unet) == adapted(module.unet)
    assert any(n.endswith("downsamplers.0.conv") for n in adapted(pipe.unet))
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = module.text_encoder(module.prompt_ids)[0][:1]
        module.unet.eval()
        trained = module.unet(latents, 10, states).sample
        loaded = pipe.unet(latents, 10, pipe.text_encoder(module.prompt_ids)[0][:1]).sample
    assert torch.equal(trained, loaded)


# Serving: one service, adapters of several tenants on one base pipeline.


@dataclass
class Serving:
    service: DiffusionService
    channel: grpc.aio.Channel
    models: Path

    @property
    def stub(self) -> diffusion_pb2_grpc.DiffusionServiceAsyncStub:
        return diffusion_pb2_grpc.DiffusionServiceStub(self.channel)


def variant(source: Path, out: Path, scale: float, text_encoder: bool) -> Path:
    """Another tenant's adapter: the trained one's weights scaled (a real
    diffusers LoRA file, different weights), optionally without its
    text-encoder part."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    with safe_open(str(source / LORA_FILE), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
        metadata = f.metadata() or {}
    if not text_encoder:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("text_encoder.")}
        meta = json.loads(metadata["lora_adapter_metadata"])
        meta = {k: v for k, v in meta.items() if not k.startswith("text_encoder")}
        metadata = {**metadata, "lora_adapter_metadata": json.dumps(meta)}
    up = [k for k in tensors if ".lora.up." in k or ".lora_B." in k]
    assert up, "diffusers names the second LoRA matrix lora.up (peft's lora_B)"
    tensors = {k: v * scale if k in up else v for k, v in tensors.items()}
    save_file(tensors, str(out / LORA_FILE), metadata=metadata)
    manifest = json.loads((source / "dreamsight_tune.json").read_text())
    manifest["text_encoder_lora"] = text_encoder
    (out / "dreamsight_tune.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
async def serving(
    trained: dict[str, Trained], sd_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Serving]:
    root = tmp_path_factory.mktemp("adapters")
    settings = DiffusionSettings(
        models=(BaseModel("sd-demo", str(sd_dir)),),
        max_loaded_models=1,
        max_loaded_adapters=2,
        concurrency=2,
        device="cpu",
        limits=Limits(default_steps=2),
        training=TrainingSettings(
            store=root / "jobs.sqlite3", artifacts_dir=root / "artifacts", concurrency=0
        ),
        server=ServerOptions(grace_s=2.0),
    )
    service = await start_service(settings)
    await service.load()
    models = root / "artifacts" / "models"
    models.mkdir(parents=True, exist_ok=True)
    lora = trained["lora"].export
    dirs = {
        ("alice", "dog"): shutil.copytree(lora, models / "alice-dog"),
        ("bob", "dog"): variant(lora, models / "bob-dog", -2.0, text_encoder=False),
        ("carol", "cat"): variant(lora, models / "carol-cat", 3.0, text_encoder=True),
        ("dave", "full"): shutil.copytree(trained["full"].export, models / "dave-full"),
    }
    for (who, name), path in dirs.items():
        await asyncio.to_thread(
            service.engine.register_fine_tuned, name, path, who, "sd-demo", f"job-{who}"
        )
    handle = Serving(service, grpc.aio.insecure_channel(f"127.0.0.1:{service.port}"), models)
    yield handle
    await handle.channel.close(None)
    await service.stop(grace_s=1.0)


async def image(s: Serving, who: str, model: str, seed: int = 1) -> bytes:
    request = diffusion_pb2.GenerateRequest(model=model, prompt=PROMPT, seed=seed)
    async for response in s.stub.Generate(request, metadata=tenant(who)):
        if response.WhichOneof("event") == "result":
            return bytes(response.result.images[0].image.data)
    raise AssertionError("no result")


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as opened:
        return np.asarray(opened.convert("RGB"))


async def test_adapters_switch_per_request_and_the_base_stays_byte_identical(
    serving: Serving, sd_dir: Path
) -> None:
    s = serving
    base = await image(s, "alice", "sd-demo")
    alone = {
        "alice": await image(s, "alice", "dog"),
        "bob": await image(s, "bob", "dog"),
        "carol": await image(s, "carol", "cat"),
    }
    images = {"base": base, **alone}
    same = [(a, b) for a in images for b in images if a < b and images[a] == images[b]]
    assert not same, f"each adapter changes the image: {same}"
    assert await image(s, "zed", "sd-demo") == base, "byte-identical after adapters were used"
    # At most two adapters stay loaded: alice's was unloaded, and comes back right.
    loaded = s.service.engine.loaded_adapters()
    assert [Path(p).name for p in loaded] == ["bob-dog", "carol-cat"]
    assert await image(s, "alice", "dog") == alone["alice"]

    # Concurrent requests for different adapters (and the base) on one base
    # pipeline, two generations at a time: each image is its own.
    wanted = [("alice", "dog"), ("bob", "dog"), ("zed", "sd-demo"), ("carol", "cat")] * 2
    together = await asyncio.gather(*(image(s, who, model) for who, model in wanted))
    for (who, model), got in zip(wanted, together, strict=True):
        assert got == (base if model == "sd-demo" else alone[who]), (who, model)

    full = await image(s, "dave", "full")
    assert full not in (base, *alone.values())
    assert await image(s, "zed", "sd-demo") == base


async def test_a_lora_export_loads_in_plain_diffusers_with_the_same_image(
    serving: Serving, trained: dict[str, Trained], sd_dir: Path
) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    served = await image(serving, "alice", "dog", seed=7)

    def plain() -> bytes:
        pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(trained["lora"].export))
        out = pipe(
            PROMPT,
            num_inference_steps=2,
            guidance_scale=7.5,
            generator=[torch.Generator("cpu").manual_seed(7)],
        ).images[0]
        buffer = io.BytesIO()
        out.save(buffer, format="PNG")
        return buffer.getvalue()

    outside = await asyncio.to_thread(plain)
    assert np.array_equal(pixels(served), pixels(outside))


async def test_tunes_are_listed_with_kind_and_size_and_private_to_their_tenant(
    serving: Serving,
) -> None:
    s = serving
    listed = await s.stub.ListModels(diffusion_pb2.ListModelsRequest(), metadata=tenant("alice"))
    models = {m.name: m for m in listed.models}
    assert set(models) == {"sd-demo", "dog"}
    base, dog = models["sd-demo"], models["dog"]
    assert (base.kind, base.size_bytes) == (diffusion_pb2.TUNE_KIND_UNSPECIFIED, 0)
    files = s.models / "alice-dog"
    on_disk = sum(p.stat().st_size for p in files.iterdir())
    assert (dog.kind, dog.size_bytes, dog.base_model) == (
        diffusion_pb2.TUNE_KIND_LORA,
        on_disk,
        "sd-demo",
    )
    listed = await s.stub.ListModels(diffusion_pb2.ListModelsRequest(), metadata=tenant("dave"))
    full = {m.name: m for m in listed.models}["full"]
    assert full.kind == diffusion_pb2.TUNE_KIND_FULL and full.size_bytes > dog.size_bytes

    # Another tenant's adapter answers as a missing model does.
    errors = []
    for model in ("cat", "no-such-model"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await image(s, "alice", model)
        errors.append(caught.value)
    assert [e.code() for e in errors] == [grpc.StatusCode.NOT_FOUND] * 2
    assert errors[0].details() == (errors[1].details() or "").replace("no-such-model", "cat")


async def test_deleting_an_adapter_model_removes_it_from_memory_and_disk(
    serving: Serving,
) -> None:
    s = serving
    await image(s, "carol", "cat")
    path = s.models / "carol-cat"
    assert str(path) in s.service.engine.loaded_adapters()
    await s.stub.DeleteModel(diffusion_pb2.DeleteModelRequest(name="cat"), metadata=tenant("carol"))
    assert str(path) not in s.service.engine.loaded_adapters()
    assert not path.exists()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await image(s, "carol", "cat")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
