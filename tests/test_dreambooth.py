"""DreamBooth jobs end to end: real gRPC, real worker processes, real Lightning.

One diffusion service (training one job at a time) serves the module, on a
SQLite job store and then on a PostgreSQL one (the tests that use it run on
each); tests run in file order and later ones use what earlier ones left (a trained model,
the class-image cache, jobs to survive a restart). Jobs train the tiny demo
Stable Diffusion at 32x32 for a few steps, with a defaults file that keeps
class and validation images to two denoising steps.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import signal
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from dreamsight.common.v1 import common_pb2
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from diffusion_service.config import (
    BaseModel,
    DiffusionSettings,
    Limits,
    TrainingLimits,
    TrainingSettings,
    parse_settings,
)
from diffusion_service.dreambooth.params import (
    Defaults,
    DrawSettings,
    JobParams,
    TrainerOptions,
    load_defaults,
)
from diffusion_service.jobs.artifacts import FineTunedModels, JobFiles
from diffusion_service.jobs.manager import TrainingManager
from diffusion_service.jobs.sqlite_store import SCHEMA_VERSION, SqliteJobStore
from diffusion_service.jobs.worker_events import WorkerEvent
from diffusion_service.registry import ModelRegistry
from diffusion_service.server import DiffusionService, start_service
from dreamsight_server.errors import NotFound
from dreamsight_server.images import ImageLimits
from dreamsight_server.lifecycle import ServerOptions
from dreamsight_server.settings import SettingsError
from tests.external_servers import postgres_server
from tests.job_store_helpers import STORE_KINDS, store_location
from tests.metrics_scrape import metrics_samples

pytestmark = pytest.mark.slow

DEFAULTS_YAML = """
max_train_steps: 4
learning_rate: 1.0e-4
checkpoint_interval: 2
trainer:
  lr_warmup_steps: 1
  keep_checkpoints: 2
class_images:
  batch_size: 2
  inference_steps: 2
validation:
  inference_steps: 2
"""
TRAINING_LIMITS = TrainingLimits(
    min_resolution=32,
    max_resolution=128,
    max_train_steps=500,
    images=ImageLimits(max_bytes=100_000, max_pixels=512 * 512),
)


@dataclass
class Training:
    """The running service, a channel to it, and what a restart needs."""

    service: DiffusionService
    channel: grpc.aio.Channel
    settings: DiffusionSettings

    @property
    def stub(self) -> diffusion_pb2_grpc.DiffusionServiceAsyncStub:
        return diffusion_pb2_grpc.DiffusionServiceStub(self.channel)

    @property
    def manager(self) -> TrainingManager:
        return self.service.training

    @property
    def files(self) -> JobFiles:
        return JobFiles(self.settings.training.artifacts_dir)

    async def restart(self) -> None:
        """Stop the service (workers checkpoint and stop) and start a new one
        on the same store and artifacts directory."""
        await self.channel.close(None)
        await self.service.stop(grace_s=1.0)
        self.service = await start_service(self.settings)
        await self.service.load()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.service.port}")


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture(scope="module", params=STORE_KINDS)
async def training(
    request: pytest.FixtureRequest, sd_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Training]:
    """The service, on a SQLite store, then again on a PostgreSQL one: the
    tests that use it run once on each (issue 18)."""
    root = tmp_path_factory.mktemp(f"dreambooth-{request.param}")
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else ""
    defaults = root / "defaults.yaml"
    defaults.write_text(DEFAULTS_YAML)
    settings = DiffusionSettings(
        models=(BaseModel("sd-demo", str(sd_dir)),),
        device="cpu",
        limits=Limits(max_steps=50, default_steps=2),
        training=TrainingSettings(
            store=store_location(request.param, root, dsn),
            artifacts_dir=root / "artifacts",
            defaults_file=defaults,
            concurrency=1,
            accelerator="cpu",
            stop_grace_s=30.0,
            cancel_grace_s=30.0,
            limits=TRAINING_LIMITS,
        ),
        server=ServerOptions(grace_s=2.0),
    )
    service = await start_service(settings)
    await service.load()
    handle = Training(service, grpc.aio.insecure_channel(f"127.0.0.1:{service.port}"), settings)
    yield handle
    await handle.channel.close(None)
    await handle.service.stop(grace_s=1.0)


def tenant(name: str, max_jobs: str | None = None) -> tuple[tuple[str, str], ...]:
    metadata = [("x-dreamsight-tenant", name)]
    if max_jobs is not None:
        metadata.append(("x-dreamsight-max-training-jobs", max_jobs))
    return tuple(metadata)


def png(width: int, height: int, seed: int) -> bytes:
    """A small photo-like PNG: a colored disc on a gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], axis=-1)
    disc = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2
    base[disc] = rng.integers(0, 255, 3)
    out = io.BytesIO()
    Image.fromarray(base.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


PHOTOS = [common_pb2.Image(data=png(48, 40, i)) for i in range(3)]


def spec(**fields: Any) -> diffusion_pb2.TrainingSpec:
    fields.setdefault("base_model", "sd-demo")
    fields.setdefault("instance_images", PHOTOS)
    fields.setdefault("instance_prompt", "a photo of sks dog")
    fields.setdefault("resolution", 32)
    fields.setdefault("seed", 3)
    return diffusion_pb2.TrainingSpec(**fields)


async def create(
    t: Training, who: str, max_jobs: str | None = None, request_id: str = "", **fields: Any
) -> diffusion_pb2.TrainingJob:
    request = diffusion_pb2.CreateTrainingJobRequest(
        spec=spec(**fields), client_request_id=request_id
    )
    response = await t.stub.CreateTrainingJob(request, metadata=tenant(who, max_jobs))
    return response.job


async def watch(
    t: Training, job_id: str, who: str, stop_when: Any = None
) -> list[diffusion_pb2.WatchTrainingJobResponse]:
    """A job's events until its last one (or until stop_when(event) is true)."""
    events = []
    call = t.stub.WatchTrainingJob(
        diffusion_pb2.WatchTrainingJobRequest(job_id=job_id), metadata=tenant(who)
    )
    async for event in call:
        events.append(event)
        if stop_when is not None and stop_when(event):
            call.cancel()
            break
    return events


def kinds(events: list[diffusion_pb2.WatchTrainingJobResponse], kind: str) -> list[Any]:
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


async def get(t: Training, job_id: str, who: str) -> diffusion_pb2.TrainingJob:
    response = await t.stub.GetTrainingJob(
        diffusion_pb2.GetTrainingJobRequest(job_id=job_id), metadata=tenant(who)
    )
    return response.job


async def generate(t: Training, who: str, model: str) -> diffusion_pb2.GenerateResult:
    request = diffusion_pb2.GenerateRequest(model=model, prompt="a photo of sks dog", seed=1)
    async for response in t.stub.Generate(request, metadata=tenant(who)):
        if response.WhichOneof("event") == "result":
            return response.result
    raise AssertionError("no result")


def model_dir(t: Training, who: str, name: str) -> Path:
    """Where the tenant's fine-tuned model of that name lives (one directory per job)."""
    entry = t.service.engine.registry.get(name, who)
    assert entry is not None and entry.info.owner == who, (who, name)
    path = Path(entry.source)
    assert path.parent == t.files.models and path.name.endswith(f"-{entry.info.job_id}")
    return path


async def wait_idle(t: Training) -> None:
    for _ in range(600):
        if t.manager.running == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("a training worker is still running")


def weights(model_dir: Path, part: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    (path,) = (model_dir / part).glob("*.safetensors")
    tensors: dict[str, Any] = load_file(str(path))
    return tensors


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


# The parts that need no service: data, loss, frozen VAE, defaults, names.


def test_preprocessing_resizes_center_crops_and_flips() -> None:
    from diffusion_service.dreambooth.data import flip, resize_and_crop, to_model_range

    # 120x60: a red left third, green middle, blue right third.
    pixels = np.zeros((60, 120, 3), dtype=np.uint8)
    pixels[:, :40, 0] = pixels[:, 40:80, 1] = pixels[:, 80:, 2] = 255
    pixels[:, 40:60, 0] = 255  # the middle's left half is yellow: shows the flip
    square = resize_and_crop(Image.fromarray(pixels), 32)
    assert square.shape == (32, 32, 3) and square.dtype == np.uint8
    # Shorter side to 32 (64x32), then the middle 32 columns: the green third
    # (yellow on its left), with only slivers of red and blue at the edges.
    assert square[16, 8].tolist() == [255, 255, 0]
    assert square[16, 24].tolist() == [0, 255, 0]
    chw = to_model_range(square)
    assert chw.shape == (3, 32, 32) and chw.min() == -1.0 and chw.max() == 1.0
    mirrored = flip(chw)
    assert (mirrored[:, :, 0] == chw[:, :, -1]).all()


def job_params(**fields: Any) -> JobParams:
    values: dict[str, Any] = {
        "base_model": "sd-demo",
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of a dog",
        "validation_prompt": "",
        "num_class_images": 2,
        "prior_loss_weight": 0.5,
        "max_train_steps": 4,
        "learning_rate": 1e-4,
        "train_text_encoder": True,
        "resolution": 32,
        "seed": 0,
        "checkpoint_interval": 2,
        "num_instance_images": 3,
        "trainer": TrainerOptions(),
        "class_images": DrawSettings(),
        "validation": DrawSettings(),
    }
    values.update(fields)
    return JobParams(**values)


def build_module(sd_dir: Path, params: JobParams) -> tuple[Any, dict[str, Any]]:
    """The Lightning module and one batch (instance and, with priors, class images)."""
    from diffusion_service.dreambooth.data import DreamBoothDataset, ImageSet, collate
    from diffusion_service.dreambooth.module import DreamBoothModule
    from diffusion_service.dreambooth.trainer import Components

    parts = Components(str(sd_dir))
    rng = np.random.default_rng(0)
    instances = ImageSet(rng.uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32), True)
    classes = ImageSet(rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32), True)
    instances.encode(parts.vae)
    classes.encode(parts.vae)
    dataset = DreamBoothDataset(instances, classes if params.with_prior else None)
    batch = collate([dataset[0], dataset[1]])
    ids = parts.prompt_ids(params.instance_prompt, params.class_prompt)
    module = DreamBoothModule(
        parts.unet, parts.text_encoder, parts.vae, parts.noise_scheduler, ids, params
    )
    return module, batch


def test_prior_loss_is_added_only_with_prior_preservation(sd_dir: Path) -> None:
    import torch

    module, batch = build_module(sd_dir, job_params(prior_loss_weight=0.5))
    assert batch["num_instance"] == 2 and batch["mean"].shape[0] == 4, "2 instance + 2 class"
    torch.manual_seed(0)
    losses = module.losses(batch)
    assert set(losses) == {"loss", "instance_loss", "prior_loss"}
    expected = losses["instance_loss"] + 0.5 * losses["prior_loss"]
    assert torch.allclose(losses["loss"], expected)
    assert losses["prior_loss"] > 0

    module, batch = build_module(sd_dir, job_params(num_class_images=0, class_prompt=""))
    assert batch["mean"].shape[0] == 2, "instance images only"
    losses = module.losses(batch)
    assert set(losses) == {"loss", "instance_loss"}
    assert torch.equal(losses["loss"], losses["instance_loss"])

    # Min-SNR weighting changes the instance loss, not its presence.
    module, batch = build_module(sd_dir, job_params(trainer=TrainerOptions(snr_gamma=5.0)))
    assert math.isfinite(float(module.losses(batch)["loss"].detach()))


def test_min_snr_weighting_is_finite_at_zero_terminal_snr(sd_dir: Path) -> None:
    """The shapes model's schedule (v-prediction, zero terminal SNR) has SNR 0 at its last
    timestep: the weight there is 0, as the diffusers scripts' min(SNR, gamma) / (SNR + 1),
    not 0/0 (which made a whole job's adapters NaN once that timestep was drawn)."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    module, _ = build_module(sd_dir, job_params(trainer=TrainerOptions(snr_gamma=5.0)))
    module.noise_scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="v_prediction", rescale_betas_zero_snr=True,
    )  # fmt: skip
    timesteps = torch.tensor([0, 500, 999])
    snr = compute_snr(module.noise_scheduler, timesteps)
    assert snr[-1] == 0
    pred, target = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)  # per-image MSE 1
    loss = module._instance_loss(pred, target, timesteps)
    expected = (torch.clamp(snr, max=5.0) / (snr + 1)).mean()
    assert torch.isfinite(loss) and torch.allclose(loss, expected)
    # The last timestep's image adds nothing (its weight is 0) and no NaN to the gradient.
    pred = torch.zeros(3, 4, 2, 2, requires_grad=True)
    module._instance_loss(pred, target, timesteps).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert torch.count_nonzero(pred.grad[-1]) == 0


def test_vae_is_frozen_in_eval_mode_and_outside_the_optimizer(sd_dir: Path) -> None:
    for train_text_encoder in (True, False):
        module, _ = build_module(sd_dir, job_params(train_text_encoder=train_text_encoder))
        module.train()
        assert not module.vae.training and module.unet.training
        assert module.text_encoder.training == train_text_encoder
        assert not any(p.requires_grad for p in module.vae.parameters())
        optimizer = module.configure_optimizers()["optimizer"]
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert optimized.isdisjoint(id(p) for p in module.vae.parameters())
        assert {id(p) for p in module.unet.parameters()} <= optimized
        te = {id(p) for p in module.text_encoder.parameters()}
        assert te <= optimized if train_text_encoder else te.isdisjoint(optimized)
        checkpoint = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)
        saved = checkpoint["state_dict"]
        assert not any(k.startswith("vae.") for k in saved)
        assert any(k.startswith("text_encoder.") for k in saved) == train_text_encoder


class Recorder:
    """An Events sink that keeps what it is told."""

    def __init__(self) -> None:
        self.items: list[WorkerEvent] = []

    def emit(self, event: WorkerEvent) -> None:
        self.items.append(event)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.items if isinstance(e, kind)]


class NoStop:
    cancelled = False
    shutting_down = False


def test_trainer_options_run_end_to_end(sd_dir: Path, tmp_path: Path) -> None:
    """Gradient accumulation, gradient checkpointing, offset noise, Min-SNR, a
    cosine schedule, pixels encoded at every step and keep-last-1
    checkpoints, in one short run in this process."""
    from diffusion_service.dreambooth.params import WorkerRuntime, WorkerSpec
    from diffusion_service.dreambooth.trainer import run_job
    from diffusion_service.jobs.worker_events import (
        CheckpointWritten,
        ClassImagesDrawn,
        StepFinished,
    )

    instance = tmp_path / "instance"
    instance.mkdir()
    for i, photo in enumerate(PHOTOS):
        (instance / f"{i}.png").write_bytes(photo.data)
    options = TrainerOptions(
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        offset_noise=0.1,
        snr_gamma=5.0,
        lr_scheduler="cosine",
        cache_latents=False,
        random_flip=False,
        keep_checkpoints=1,
    )
    params = job_params(
        num_class_images=0,
        class_prompt="",
        max_train_steps=2,
        checkpoint_interval=1,
        trainer=options,
    )
    runtime = WorkerRuntime(
        job_id="j" * 22,
        base_source=str(sd_dir),
        instance_dir=str(instance),
        class_cache_dir=str(tmp_path / "class-images"),
        export_dir=str(tmp_path / "export"),
        accelerator="cpu",
    )
    events = Recorder()
    assert run_job(WorkerSpec(params, runtime), tmp_path, events, NoStop()) == "exported"
    assert [e.step for e in events.of(StepFinished)] == [1, 2]
    assert [e.step for e in events.of(CheckpointWritten)] == [1, 2]
    assert not events.of(ClassImagesDrawn), "no prior preservation, no class images"
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["last.ckpt", "step-000002.ckpt"]
    assert (tmp_path / "export" / "dreamsight_tune.json").is_file()


def test_defaults_file_is_strict(tmp_path: Path) -> None:
    packaged = load_defaults()
    assert isinstance(packaged, Defaults)
    assert packaged.learning_rate == 5e-6 and packaged.trainer.adam_weight_decay == 1e-2
    for text, words in [
        ("max_train_step: 3\n", "unknown key"),
        ("trainer:\n  lr_scheduler: sometimes\n", "lr_scheduler"),
        ("trainer:\n  train_batch_size: two\n", "train_batch_size"),
        ("learning_rate: -1\n", "learning_rate"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=words):
            load_defaults(bad)


def test_training_settings_come_from_flags_and_environment(tmp_path: Path) -> None:
    env = {
        "DREAMSIGHT_DIFFUSION_TRAINING_CONCURRENCY": "2",
        "DREAMSIGHT_DIFFUSION_ARTIFACTS_DIR": str(tmp_path),
    }
    flags = [
        "--model=sd-demo=/models/sd",
        "--training-devices=4",
        "--training-strategy=ddp",
        "--training-accelerator=gpu",
    ]
    t = parse_settings(flags, env).training
    assert (t.concurrency, t.artifacts_dir, t.devices, t.strategy) == (2, tmp_path, 4, "ddp")
    assert (t.accelerator, t.torch_threads) == ("gpu", 1)
    assert isinstance(t.store, Path) and t.store.name == "jobs.sqlite3"
    url = "postgresql://dreamsight@db:5432/jobs"
    shared = parse_settings(["--model=m", f"--training-store={url}", "--training-lease-s=9"], {})
    assert (shared.training.store, shared.training.lease_s) == (url, 9.0)
    with pytest.raises(SettingsError, match="--training-store: 'mysql://x'"):
        parse_settings(["--model=m", "--training-store=mysql://x"], {})
    with pytest.raises(SettingsError, match="--training-max-images is at most 20"):
        parse_settings(["--model=m", "--training-max-images=21"], {})


def test_job_ids_and_model_names_cannot_leave_their_directories(tmp_path: Path) -> None:
    files = JobFiles(tmp_path)
    for name in ("../x", "a/b", "..", ".hidden", "x" * 101, ""):
        with pytest.raises(ValueError):
            files.model_dir(name)
    for job_id in ("../../../etc/passwd", "short", "a" * 21 + "/"):
        with pytest.raises(ValueError):
            files.job_dir(job_id)
    assert files.model_dir("alice-dog.v2") == tmp_path / "models" / "alice-dog.v2"


@contextmanager
def persisted_registry(sd_dir: Path, root: Path) -> Iterator[ModelRegistry]:
    """A registry over the store and artifacts under root, as a fresh service
    would build it: base model added, persisted fine-tuned models restored."""
    store = SqliteJobStore(root / "jobs.sqlite3")
    registry = ModelRegistry(persistence=FineTunedModels(store, JobFiles(root / "artifacts")))
    registry.add_base(BaseModel("sd-demo", str(sd_dir)))
    try:
        yield registry
    finally:
        store.close()


def fine_tuned(registry: ModelRegistry, tenant: str) -> list[tuple[str, str]]:
    return [(i.name, i.job_id) for i in registry.visible(tenant) if i.fine_tuned]


def test_two_tenants_models_of_one_name_are_restored_after_a_restart(
    sd_dir: Path, tmp_path: Path
) -> None:
    with persisted_registry(sd_dir, tmp_path) as first:
        assert first.restore() == 0
        first.register_fine_tuned("my-dog", sd_dir, "alice", "sd-demo", "job-a")
        first.register_fine_tuned("my-dog", sd_dir, "bob", "sd-demo", "job-b")
    with persisted_registry(sd_dir, tmp_path) as second:
        assert second.restore() == 2
        assert fine_tuned(second, "alice") == [("my-dog", "job-a")]
        assert fine_tuned(second, "bob") == [("my-dog", "job-b")]
        assert fine_tuned(second, "mallory") == []
        assert second.resolve("my-dog", "bob").info.job_id == "job-b"
        second.delete("my-dog", "bob")  # only bob's row goes
    with persisted_registry(sd_dir, tmp_path) as third:
        assert third.restore() == 1
        assert third.resolve("my-dog", "alice").info.job_id == "job-a"
        with pytest.raises(NotFound, match=r"^model 'my-dog' not found$"):
            third.resolve("my-dog", "bob")
    assert sd_dir.is_dir(), "a directory from outside the artifacts is never deleted"


def test_a_model_adopted_by_a_refresh_while_a_request_names_it_still_resolves(
    sd_dir: Path, tmp_path: Path
) -> None:
    """A replica refreshes when it hears another one's job succeed, while a
    request for that model may be adopting it too: whichever thread wins,
    the request resolves (it was a NOT_FOUND)."""
    with persisted_registry(sd_dir, tmp_path) as trainer:
        trainer.register_fine_tuned("my-dog", sd_dir, "alice", "sd-demo", "job-a")
    with persisted_registry(sd_dir, tmp_path) as other:
        persistence = other._persistence
        assert persistence is not None
        found = persistence.find

        def find_then_refresh(name: str, tenant: str) -> Any:
            saved = found(name, tenant)
            assert other.refresh() == 1  # the refresh gets there first
            return saved

        persistence.find = find_then_refresh  # type: ignore[method-assign]
        assert other.resolve("my-dog", "alice").info.job_id == "job-a"
        assert fine_tuned(other, "alice") == [("my-dog", "job-a")]


def test_a_schema_1_store_keyed_by_name_alone_is_migrated(sd_dir: Path, tmp_path: Path) -> None:
    """A store written before names were per tenant still loads, and its
    models then share their names with other tenants' like any other."""
    old = sqlite3.connect(tmp_path / "jobs.sqlite3")
    old.executescript(
        "CREATE TABLE fine_tuned_models (name TEXT PRIMARY KEY, tenant TEXT NOT NULL,"
        " base_model TEXT NOT NULL, job_id TEXT NOT NULL, path TEXT NOT NULL,"
        " create_time REAL NOT NULL);"
        f"INSERT INTO fine_tuned_models VALUES ('my-dog', 'alice', 'sd-demo', 'job-a',"
        f" '{sd_dir}', 1.0);"
        "PRAGMA user_version=1;"
    )
    old.close()
    with persisted_registry(sd_dir, tmp_path) as registry:
        assert registry.restore() == 1
        registry.register_fine_tuned("my-dog", sd_dir, "bob", "sd-demo", "job-b")
    with persisted_registry(sd_dir, tmp_path) as registry:
        assert registry.restore() == 2
        assert fine_tuned(registry, "alice") == [("my-dog", "job-a")]
        assert fine_tuned(registry, "bob") == [("my-dog", "job-b")]
    check = sqlite3.connect(tmp_path / "jobs.sqlite3")
    try:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = check.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        assert ("fine_tuned_models_v1",) not in tables
    finally:
        check.close()


# The service.

BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("no images", {"instance_images": []}, "spec.instance_images"),
    ("21 images", {"instance_images": PHOTOS * 7}, "spec.instance_images"),
    (
        "undecodable image",
        {"instance_images": [PHOTOS[0], common_pb2.Image(data=b"not an image")]},
        "spec.instance_images[1]",
    ),
    (
        "oversized image",
        {"instance_images": [common_pb2.Image(data=b"\x89PNG" + bytes(100_000))]},
        "spec.instance_images[0]",
    ),
    ("empty prompt", {"instance_prompt": "  "}, "spec.instance_prompt"),
    ("prompt over 77 tokens", {"instance_prompt": "a " * 80}, "spec.instance_prompt"),
    (
        "class prompt over 77 tokens",
        {"num_class_images": 1, "class_prompt": "a " * 80},
        "spec.class_prompt",
    ),
    ("class images without a class prompt", {"num_class_images": 2}, "spec.class_prompt"),
    (
        "too many class images",
        {"num_class_images": 5000, "class_prompt": "a dog"},
        "spec.num_class_images",
    ),
    ("too many steps", {"max_train_steps": 501}, "spec.max_train_steps"),
    ("negative learning rate", {"learning_rate": -1e-5}, "spec.learning_rate"),
    ("learning rate too high", {"learning_rate": 0.5}, "spec.learning_rate"),
    ("learning rate NaN", {"learning_rate": math.nan}, "spec.learning_rate"),
    ("prior weight infinite", {"prior_loss_weight": math.inf}, "spec.prior_loss_weight"),
    ("resolution not a multiple of 8", {"resolution": 60}, "spec.resolution"),
    ("resolution too large", {"resolution": 256}, "spec.resolution"),
    ("negative seed", {"seed": -1}, "spec.seed"),
    ("model name with a path", {"output_model_name": "../../etc"}, "spec.output_model_name"),
    ("taken model name", {"output_model_name": "sd-demo"}, "FAILED_PRECONDITION"),
    ("unknown base model", {"base_model": "nope"}, "NOT_FOUND"),
    ("unknown kind", {"kind": 7}, "spec.kind"),
    ("LoRA rank too high", {"rank": 129}, "spec.rank"),
    ("LoRA alpha NaN", {"lora_alpha": math.nan}, "spec.lora_alpha"),
    ("unknown LoRA layer", {"lora_layers": ["to_q", "nope"]}, "spec.lora_layers[1]"),
    ("whole text encoder on a LoRA job", {"train_text_encoder": True}, "spec.train_text_encoder"),
    (
        "text-encoder LoRA on a full tune",
        {"kind": diffusion_pb2.TUNE_KIND_FULL, "train_text_encoder_lora": True},
        "spec.train_text_encoder_lora",
    ),
    ("LoRA rank on a full tune", {"kind": diffusion_pb2.TUNE_KIND_FULL, "rank": 8}, "spec.rank"),
]


@pytest.mark.parametrize(("name", "fields", "field"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
async def test_bad_requests_are_rejected_naming_the_field(
    training: Training, name: str, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(training, "checker", **fields)
    error = caught.value
    if field.isupper():  # not the request's shape: a status code instead of a field
        assert error.code().name == field, error.details()
    else:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert (error.details() or "").startswith(f"{field}: "), error.details()
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad) and bad.field_violations[0].field == field
    listed = await training.stub.ListTrainingJobs(
        diffusion_pb2.ListTrainingJobsRequest(), metadata=tenant("checker")
    )
    assert not listed.jobs, "nothing was created"


async def test_create_is_idempotent_and_the_tier_limit_holds(training: Training) -> None:
    first = await create(training, "quota", max_jobs="1", request_id="req-1")
    assert first.state in (diffusion_pb2.JOB_STATE_QUEUED, diffusion_pb2.JOB_STATE_RUNNING)
    assert len(first.job_id) == 22
    again = await create(training, "quota", max_jobs="1", request_id="req-1")
    assert again.job_id == first.job_id, "a retry returns the first job, even at the limit"
    # The same id from another tenant is another job.
    other = await create(training, "quota-2", max_jobs="1", request_id="req-1")
    assert other.job_id != first.job_id

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(training, "quota", max_jobs="1")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    quota = error_details_pb2.QuotaFailure()
    assert any(d.Unpack(quota) for d in status.details)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(training, "quota", max_jobs="many")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    second = await create(training, "quota")  # no header: no limit
    third = await create(training, "quota", max_jobs="3")

    listed = await training.stub.ListTrainingJobs(
        diffusion_pb2.ListTrainingJobsRequest(page_size=2), metadata=tenant("quota")
    )
    assert [j.job_id for j in listed.jobs] == [third.job_id, second.job_id], "newest first"
    rest = await training.stub.ListTrainingJobs(
        diffusion_pb2.ListTrainingJobsRequest(page_size=2, page_token=listed.next_page_token),
        metadata=tenant("quota"),
    )
    assert [j.job_id for j in rest.jobs] == [first.job_id] and not rest.next_page_token

    for who, job in [("quota", first), ("quota", second), ("quota", third), ("quota-2", other)]:
        cancelled = await training.stub.CancelTrainingJob(
            diffusion_pb2.CancelTrainingJobRequest(job_id=job.job_id), metadata=tenant(who)
        )
        assert cancelled.job.state == diffusion_pb2.JOB_STATE_CANCELLED
    # Ended jobs no longer count against the limit.
    fourth = await create(training, "quota", max_jobs="1")
    await training.stub.CancelTrainingJob(
        diffusion_pb2.CancelTrainingJobRequest(job_id=fourth.job_id), metadata=tenant("quota")
    )
    await wait_idle(training)


async def test_job_trains_exports_and_its_model_generates(training: Training, sd_dir: Path) -> None:
    """A full tune (the LoRA kind has its own tests in test_lora_tunes.py)."""
    job = await create(
        training,
        "alice",
        kind=diffusion_pb2.TUNE_KIND_FULL,
        num_class_images=2,
        class_prompt="a photo of a dog",
        train_text_encoder=True,
        validation_prompt="a photo of sks dog",
        output_model_name="alice-dog",
    )
    assert job.spec.max_train_steps == 4 and job.spec.checkpoint_interval == 2, "from the YAML"
    assert job.spec.learning_rate == pytest.approx(1e-4)
    assert job.spec.kind == diffusion_pb2.TUNE_KIND_FULL and job.spec.rank == 0
    events = await watch(training, job.job_id, "alice")
    assert events[0].WhichOneof("event") == "queued"
    classes = kinds(events, "class_images")
    assert (classes[0].total, classes[-1].done) == (2, 2)
    steps = kinds(events, "training_step")
    assert [(s.step, s.total_steps) for s in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(s.loss > 0 for s in steps)
    # One warm-up step (diffusers' schedule starts at 0), then the peak rate.
    assert [s.learning_rate for s in steps] == [0] + [pytest.approx(1e-4)] * 3
    assert [c.step for c in kinds(events, "checkpoint_saved")] == [2, 4]
    validation = kinds(events, "validation_image")
    assert [v.step for v in validation] == [2, 4]
    with Image.open(io.BytesIO(validation[0].image.data)) as image:
        assert image.size == (32, 32)
    assert events[-1].WhichOneof("event") == "succeeded"
    assert events[-1].succeeded.model == "alice-dog"
    assert events[-1].state == diffusion_pb2.JOB_STATE_SUCCEEDED

    # A watcher that comes late gets the same history.
    assert await watch(training, job.job_id, "alice") == events

    done = await get(training, job.job_id, "alice")
    assert (done.state, done.step, done.model) == (
        diffusion_pb2.JOB_STATE_SUCCEEDED,
        4,
        "alice-dog",
    )
    assert done.HasField("end_time")
    total = done.usage.total_time.ToTimedelta().total_seconds()
    assert 0 < done.usage.gpu_seconds <= total

    listed = await training.stub.ListModels(
        diffusion_pb2.ListModelsRequest(), metadata=tenant("alice")
    )
    mine = {m.name: m for m in listed.models}["alice-dog"]
    assert mine.origin == common_pb2.MODEL_ORIGIN_FINE_TUNED and mine.job_id == job.job_id
    assert mine.demo, "a fine-tune of a toy is a toy"
    result = await generate(training, "alice", "alice-dog")
    assert result.model == "alice-dog" and len(result.images) == 1

    # Only what changed is exported; the rest comes from the base.
    model_dir_ = model_dir(training, "alice", "alice-dog")
    for part in ("unet", "text_encoder"):
        assert not same_weights(weights(model_dir_, part), weights(sd_dir, part)), part
    exported = sorted(p.name for p in model_dir_.iterdir())
    assert exported == ["dreamsight_tune.json", "text_encoder", "unet"]
    assert mine.kind == diffusion_pb2.TUNE_KIND_FULL
    assert mine.size_bytes == sum(p.stat().st_size for p in model_dir_.rglob("*") if p.is_file())
    job_dir = training.files.job_dir(job.job_id)
    assert list((job_dir / "tensorboard" / "run").glob("events.out.tfevents.*"))
    assert not (job_dir / "checkpoints").exists() and not (job_dir / "instance").exists()

    port = training.service.server.metrics_port
    assert port
    metrics = await asyncio.to_thread(metrics_samples, port)
    assert metrics['dreamsight_diffusion_training_jobs_total{state="succeeded"}'] >= 1
    assert metrics["dreamsight_diffusion_training_steps_total"] >= 4
    assert metrics["dreamsight_diffusion_training_gpu_seconds_total"] >= done.usage.gpu_seconds
    assert metrics["dreamsight_diffusion_training_jobs_running"] == 0
    assert metrics["dreamsight_diffusion_training_jobs_queued"] == 0


async def test_a_second_job_of_the_same_class_reuses_its_images(
    training: Training, sd_dir: Path
) -> None:
    cache = training.files.class_images
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    before = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    job = await create(
        training,
        "alice",
        num_class_images=2,
        class_prompt="a photo of a dog",
        max_train_steps=2,
        output_model_name="alice-dog-2",
    )
    events = await watch(training, job.job_id, "alice")
    assert events[-1].WhichOneof("event") == "succeeded", events[-1]
    assert [(c.done, c.total) for c in kinds(events, "class_images")] == [(2, 2)], "all cached"
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == before
    assert [p for p in cache.iterdir() if p.is_dir()] == [entry]
    # A LoRA job (the default kind) with class priors: only the adapter is exported.
    exported = model_dir(training, "alice", "alice-dog-2")
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["dreamsight_tune.json", "pytorch_lora_weights.safetensors"]
    assert (await get(training, job.job_id, "alice")).spec.kind == diffusion_pb2.TUNE_KIND_LORA


async def test_other_tenants_cannot_see_or_touch_a_job_or_its_model(training: Training) -> None:
    listed = await training.stub.ListTrainingJobs(
        diffusion_pb2.ListTrainingJobsRequest(), metadata=tenant("alice")
    )
    job_id = next(j.job_id for j in listed.jobs if j.model == "alice-dog")

    async def call(name: str, target: str) -> object:
        mallory = tenant("mallory")
        if name == "get":
            request = diffusion_pb2.GetTrainingJobRequest(job_id=target)
            return await training.stub.GetTrainingJob(request, metadata=mallory)
        if name == "cancel":
            cancel = diffusion_pb2.CancelTrainingJobRequest(job_id=target)
            return await training.stub.CancelTrainingJob(cancel, metadata=mallory)
        return await watch(training, target, "mallory")

    for name in ("get", "cancel", "watch"):
        details = []
        for target in (job_id, "A" * 22, "../etc"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(name, target)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, name
            details.append((caught.value.details() or "").replace(target, "ID"))
        assert len(set(details)) == 1, f"{name}: another tenant's job reads as a missing one"
    theirs = await training.stub.ListTrainingJobs(
        diffusion_pb2.ListTrainingJobsRequest(), metadata=tenant("mallory")
    )
    assert not theirs.jobs
    models = await training.stub.ListModels(
        diffusion_pb2.ListModelsRequest(), metadata=tenant("mallory")
    )
    assert [m.name for m in models.models] == ["sd-demo"]
    # Alice's model reads, to mallory, exactly as a name nobody registered.
    for model in ("alice-dog", "nobody-is"):  # same length: same message bytes
        with pytest.raises(grpc.aio.AioRpcError) as generating:
            await generate(training, "mallory", model)
        with pytest.raises(grpc.aio.AioRpcError) as deleting:
            await training.stub.DeleteModel(
                diffusion_pb2.DeleteModelRequest(name=model), metadata=tenant("mallory")
            )
        for caught in (generating, deleting):
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND, model
            assert caught.value.details() == f"model {model!r} not found"
    assert (await get(training, job_id, "alice")).state == diffusion_pb2.JOB_STATE_SUCCEEDED
    assert (await generate(training, "alice", "alice-dog")).model == "alice-dog"


async def test_output_model_names_are_checked_in_the_tenants_own_namespace(
    training: Training,
) -> None:
    """Mallory may queue a job making "alice-dog" (alice's model is no name
    of hers), and a name one tenant's active job reserves is free to another;
    the tenant's own names and base model names stay taken."""
    jobs = [
        (await create(training, "mallory", max_train_steps=400, output_model_name="alice-dog")),
        (await create(training, "mallory", max_train_steps=400, output_model_name="pet")),
        (await create(training, "alice", max_train_steps=400, output_model_name="pet")),
    ]
    owners = ("mallory", "mallory", "alice")
    try:
        accepted = (diffusion_pb2.JOB_STATE_QUEUED, diffusion_pb2.JOB_STATE_RUNNING)
        for job, who in zip(jobs, owners, strict=True):
            assert job.state in accepted, (who, job.spec)
        assert [j.spec.output_model_name for j in jobs] == ["alice-dog", "pet", "pet"]
        for who, name in [("alice", "alice-dog"), ("mallory", "pet"), ("alice", "sd-demo")]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await create(training, who, max_train_steps=400, output_model_name=name)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (who, name)
            assert "choose another name" in (caught.value.details() or "")
    finally:
        for job, who in zip(jobs, owners, strict=True):
            await training.stub.CancelTrainingJob(
                diffusion_pb2.CancelTrainingJobRequest(job_id=job.job_id), metadata=tenant(who)
            )
        await wait_idle(training)
    assert (await generate(training, "alice", "alice-dog")).model == "alice-dog"


async def test_cancel_stops_the_worker_within_a_step_and_registers_nothing(
    training: Training,
) -> None:
    job = await create(training, "alice", max_train_steps=400, output_model_name="never")
    seen = await watch(training, job.job_id, "alice", lambda e: e.training_step.step >= 1)
    assert kinds(seen, "training_step")
    response = await training.stub.CancelTrainingJob(
        diffusion_pb2.CancelTrainingJobRequest(job_id=job.job_id), metadata=tenant("alice")
    )
    assert response.job.state == diffusion_pb2.JOB_STATE_CANCELLED
    events = await watch(training, job.job_id, "alice")
    assert events[-1].WhichOneof("event") == "cancelled"
    assert kinds(events, "training_step")[-1].step < 400
    await wait_idle(training)
    record = training.manager.recent[-1]
    assert (record.job_id, record.outcome) == (job.job_id, "cancelled")
    assert record.step_at_cancel is not None
    assert record.last_step - record.step_at_cancel <= 1, "stopped after the running step"
    assert record.exit_code == 0, "it stopped by itself, it was not killed"
    again = await training.stub.CancelTrainingJob(
        diffusion_pb2.CancelTrainingJobRequest(job_id=job.job_id), metadata=tenant("alice")
    )
    assert again.job.state == diffusion_pb2.JOB_STATE_CANCELLED and again.job.HasField("end_time")
    models = await training.stub.ListModels(
        diffusion_pb2.ListModelsRequest(), metadata=tenant("alice")
    )
    assert "never" not in [m.name for m in models.models]
    assert not list(training.files.models.glob(f"*{job.job_id}")), "no model directory"
    assert not training.files.partial_export(job.job_id).exists()
    assert not (training.files.job_dir(job.job_id) / "checkpoints").exists()


async def test_delete_model_removes_its_files(training: Training) -> None:
    exported = model_dir(training, "alice", "alice-dog-2")
    assert exported.is_dir()
    await training.stub.DeleteModel(
        diffusion_pb2.DeleteModelRequest(name="alice-dog-2"), metadata=tenant("alice")
    )
    assert not exported.exists()
    models = await training.stub.ListModels(
        diffusion_pb2.ListModelsRequest(), metadata=tenant("alice")
    )
    assert "alice-dog-2" not in [m.name for m in models.models]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(training, "alice", "alice-dog-2")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def all_jobs(t: Training) -> dict[str, tuple[int, str]]:
    jobs: dict[str, tuple[int, str]] = {}
    for who in ("alice", "quota", "quota-2", "bob"):
        listed = await t.stub.ListTrainingJobs(
            diffusion_pb2.ListTrainingJobsRequest(), metadata=tenant(who)
        )
        jobs.update({j.job_id: (int(j.state), j.model) for j in listed.jobs})
    return jobs


async def test_a_killed_worker_and_a_restart_resume_from_checkpoints(training: Training) -> None:
    """Kill the worker mid-run: the job resumes from its last checkpoint. Then
    restart the service mid-run: workers checkpoint, the new service resumes
    the job, and it ends with the steps it was asked for; every job and model
    is still there."""
    total = 30
    job = await create(training, "bob", max_train_steps=total, output_model_name="bob-dog")
    await watch(training, job.job_id, "bob", lambda e: e.checkpoint_saved.step >= 2)
    pid = training.manager.worker_pid(job.job_id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # The service notices, requeues the job and starts a new worker, which
    # continues from the checkpoint; let it train a little, then restart.
    events = await watch(training, job.job_id, "bob", lambda e: e.training_step.step >= 8)
    first = training.manager
    steps = [e.training_step.step for e in events if e.WhichOneof("event") == "training_step"]
    queued = [i for i, e in enumerate(events) if e.WhichOneof("event") == "queued"]
    assert len(queued) == 2, "queued at creation, requeued after the kill"
    after = [
        e.training_step.step
        for e in events[queued[1] :]
        if e.WhichOneof("event") == "training_step"
    ]
    crashed = [r for r in first.recent if r.job_id == job.job_id]
    assert crashed[0].outcome == "crashed" and crashed[0].exit_code == -signal.SIGKILL
    checkpoint = max(c.step for c in kinds(events[: queued[1]], "checkpoint_saved"))
    assert after[0] == checkpoint + 1, f"continued from step {checkpoint}: {steps}"
    # The LR schedule was restored too: one warm-up step, never again.
    rates = [(s.step, s.learning_rate) for s in kinds(events, "training_step")]
    assert all(rate == pytest.approx(1e-4) for step, rate in rates if step > 1), rates

    before = await all_jobs(training)
    await training.restart()
    second = training.manager
    assert second is not first
    (stopped,) = [r for r in first.recent if r.job_id == job.job_id][1:]
    assert stopped.outcome == "shutdown" and stopped.exit_code == 0
    resumed_step = stopped.last_step

    events = await watch(training, job.job_id, "bob")
    assert events[-1].WhichOneof("event") == "succeeded", events[-1]
    (last_run,) = [r for r in second.recent if r.job_id == job.job_id]
    assert last_run.resumed_from == resumed_step, "the shutdown checkpoint was the last step"
    assert last_run.last_step == total
    requeued = max(i for i, e in enumerate(events) if e.WhichOneof("event") == "queued")
    tail = [s.step for s in kinds(events[requeued:], "training_step")]
    assert tail == list(range(resumed_step + 1, total + 1))
    assert {s.total_steps for s in kinds(events, "training_step")} == {total}
    done = await get(training, job.job_id, "bob")
    assert (done.state, done.step, done.model) == (
        diffusion_pb2.JOB_STATE_SUCCEEDED,
        total,
        "bob-dog",
    )
    job_dir = training.files.job_dir(job.job_id)
    assert [p.name for p in (job_dir / "tensorboard").iterdir()] == ["run"], "one run directory"

    # Every job survived the restart; the ones that had ended are unchanged.
    after_restart = await all_jobs(training)
    assert after_restart.keys() == before.keys()
    for job_id, (state, model) in before.items():
        if job_id != job.job_id:
            assert after_restart[job_id] == (state, model)
    # So did the fine-tuned models: registrations are persisted.
    result = await generate(training, "alice", "alice-dog")
    assert result.model == "alice-dog"
    assert (await generate(training, "bob", "bob-dog")).model == "bob-dog"


async def test_two_devices_train_with_ddp_and_are_charged_twice(
    sd_dir: Path, tmp_path: Path
) -> None:
    """Lightning's devices and strategy come from the settings: two CPU
    processes (gloo) train one job, and it is charged devices x wall time."""
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(DEFAULTS_YAML)
    settings = DiffusionSettings(
        models=(BaseModel("sd-demo", str(sd_dir)),),
        device="cpu",
        training=TrainingSettings(
            store=tmp_path / "jobs.sqlite3",
            artifacts_dir=tmp_path / "artifacts",
            defaults_file=defaults,
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            limits=TRAINING_LIMITS,
        ),
        server=ServerOptions(metrics_port=None),
    )
    service = await start_service(settings)
    await service.load()
    t = Training(service, grpc.aio.insecure_channel(f"127.0.0.1:{service.port}"), settings)
    try:
        job = await create(t, "carol", max_train_steps=2, output_model_name="carol-dog")
        events = await watch(t, job.job_id, "carol")
        assert events[-1].WhichOneof("event") == "succeeded", events[-1]
        assert [s.step for s in kinds(events, "training_step")] == [1, 2], "no step twice"
        done = await get(t, job.job_id, "carol")
        total = done.usage.total_time.ToTimedelta().total_seconds()
        assert 1.5 * total < done.usage.gpu_seconds <= 2 * total
        log = (t.files.job_dir(job.job_id) / "worker.log").read_text()
        assert "MEMBER: 2/2" in log, "a second rank joined"
    finally:
        await t.channel.close(None)
        await service.stop(grace_s=1.0)
