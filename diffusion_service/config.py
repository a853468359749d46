"""The diffusion service's one typed settings object.

Each setting is declared once below (default, help, limits); ``--help``
lists them with their ``DREAMSIGHT_DIFFUSION_*`` variables. Built in
``main()``; nothing is read at import time. The gateway secret comes from
the environment or a file only, never from a flag (``ps`` shows flags).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from diffusion_service.jobs.store import parse_location
from dreamsight_server.images import ImageLimits
from dreamsight_server.lifecycle import ServerOptions
from dreamsight_server.settings import (
    SettingsError,
    gateway_secret_setting,
    group,
    parse,
    setting,
    trust_any_caller_setting,
)

TRAINING_DIR = Path(".dreamsight/training")
MAX_INSTANCE_IMAGES = 20
# A CreateTrainingJob carries the subject's photos (often several MB each):
# gRPC's default 4 MiB would refuse three phone pictures.
MAX_REQUEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class BaseModel:
    """A base model shared by all tenants: a diffusers directory or hub id."""

    name: str
    source: str

    @classmethod
    def parse(cls, text: str) -> BaseModel:
        """``NAME=SOURCE``, or ``SOURCE`` named after its last path part."""
        name, sep, source = text.partition("=")
        if not sep:
            source = text
            name = Path(text.rstrip("/")).name
        if not name or not source:
            raise ValueError(f"bad model {text!r}: expected NAME=SOURCE or SOURCE")
        return cls(name=name, source=source)


@dataclass(frozen=True)
class Limits:
    """What one Generate request may ask for."""

    min_size: int = setting(64, "smallest width or height in pixels", minimum=8)
    max_size: int = setting(1024, "largest width or height in pixels", minimum=8)
    max_steps: int = setting(150, "most denoising steps a request may ask for", minimum=1)
    default_steps: int = setting(25, "denoising steps when a request sets none", minimum=1)
    max_guidance_scale: float = setting(50.0, "largest guidance scale", minimum=0)
    default_guidance_scale: float = setting(
        7.5, "guidance scale when a request sets none", minimum=0
    )
    max_images: int = setting(4, "images one request may ask for", minimum=1)


@dataclass(frozen=True)
class TrainingLimits:
    """What one CreateTrainingJob request may ask for."""

    max_instance_images: int = setting(
        MAX_INSTANCE_IMAGES,
        f"subject photos one job may carry (at most {MAX_INSTANCE_IMAGES})",
        flag="max-images",
        minimum=1,
    )
    max_train_steps: int = setting(
        5000, "most steps one job may ask for", flag="max-steps", minimum=1
    )
    max_learning_rate: float = 1e-3
    min_resolution: int = 64
    max_resolution: int = 1024
    max_class_images: int = 1000
    max_prior_loss_weight: float = 100.0
    max_lora_rank: int = setting(128, "largest LoRA rank one job may ask for", minimum=1)
    max_lora_alpha: float = 1024.0
    images: ImageLimits = field(
        default_factory=lambda: ImageLimits(max_bytes=10 * 1024 * 1024, max_pixels=4096 * 4096)
    )


@dataclass(frozen=True)
class TrainingSettings:
    """DreamBooth jobs: where they live, how many run, on what."""

    store: Path | str = setting(
        TRAINING_DIR / "jobs.sqlite3",
        "the job store: a SQLite file (made on first use; one replica) or a postgresql:// URL "
        "(shared by every replica)",
        parse=parse_location,
    )
    artifacts_dir: Path = setting(
        TRAINING_DIR,
        "job work directories, the class-image cache and the fine-tuned models",
        flag="--artifacts-dir",
    )
    defaults_file: Path | None = setting(
        None,
        "DreamBooth defaults (YAML); none: the packaged dreambooth_defaults.yaml",
        flag="defaults",
    )
    concurrency: int = setting(
        1,
        "jobs this replica trains at once, each in its own worker process; 0 trains none (a "
        "replica that only generates, and still creates, watches and cancels jobs)",
        minimum=0,
    )
    lease_s: float = setting(
        30.0,
        "how long a replica's claim on a running job lasts unless renewed (every third of it); "
        "a job whose replica died resumes elsewhere after this",
        minimum=1,
    )
    replica_id: str = setting(
        "", "this replica's name in job leases; empty: host name, process id and a random tag"
    )
    max_crashes: int = setting(
        2, "worker deaths (not shutdowns) a job survives by resuming; one more fails it", minimum=0
    )
    accelerator: str = setting("auto", "Lightning's accelerator: auto, cpu, gpu")
    devices: int = setting(
        1, "devices per job (GPU-seconds are devices times wall time)", minimum=1
    )
    strategy: str = setting("auto", "Lightning's strategy, e.g. ddp across several GPUs")
    torch_threads: int = setting(1, "intra-op threads of each training worker", minimum=1)
    stop_grace_s: float = 30.0
    """On shutdown: time for workers to checkpoint and exit before they are killed
    (the service's --grace-seconds)."""
    cancel_grace_s: float = 10.0
    """On cancel: time for a worker to stop after its step before it is killed."""
    limits: TrainingLimits = group(TrainingLimits)


@dataclass(frozen=True)
class DiffusionSettings:
    """Everything the diffusion service needs to start."""

    ENV_PREFIX: ClassVar[str] = "DREAMSIGHT_DIFFUSION_"

    models: tuple[BaseModel, ...] = setting(
        (),
        "base model as NAME=SOURCE or SOURCE, a diffusers directory or hub id; the first is "
        "the default (required)",
        flag="model",
        env="MODELS",
        parse=BaseModel.parse,
        repeat=True,
    )
    max_loaded_models: int = setting(
        2, "pipelines kept in memory (least recently used evicted first)", minimum=1
    )
    max_loaded_adapters: int = setting(
        16,
        "LoRA adapters kept loaded on each base pipeline (least recently used unloaded first); "
        "one tenant's adapter is active only in that tenant's generations",
        minimum=1,
    )
    max_adapter_cache_mb: int = setting(
        512, "MiB of LoRA adapters kept loaded on each base pipeline", minimum=1
    )
    concurrency: int = setting(1, "generations running at once, each in a worker thread", minimum=1)
    max_queue: int = setting(8, "generations waiting for a worker; more are refused", minimum=0)
    torch_threads: int = setting(1, "intra-op threads of each generation worker", minimum=1)
    device: str = setting("auto", "auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    dtype: str = setting(
        "auto", "auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16"
    )
    devices_per_worker: float = setting(
        1.0, "accelerators each request shares, for GPU-second metering (g in g*dt/n)", minimum=0
    )
    limits: Limits = group(Limits)
    training: TrainingSettings = group(TrainingSettings, prefix="training-")
    gateway_secret: str = gateway_secret_setting()
    trust_any_caller: bool = trust_any_caller_setting()
    server: ServerOptions = group(
        lambda: ServerOptions(port=50053, metrics_port=9103, max_receive_bytes=MAX_REQUEST_BYTES)
    )

    @property
    def default_model(self) -> BaseModel:
        """The model used when a request names none."""
        return self.models[0]


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> DiffusionSettings:
    """Settings from flags, then DREAMSIGHT_DIFFUSION_* variables, then the defaults."""
    s = parse(
        DiffusionSettings,
        argv,
        env,
        "python -m diffusion_service",
        "dreamsight diffusion: Stable Diffusion generation and DreamBooth training",
    )
    if not s.models:
        raise SettingsError("--model: at least one base model is required")
    if len({m.name for m in s.models}) != len(s.models):
        raise SettingsError("--model: base model names must be unique")
    if s.limits.min_size > s.limits.max_size:
        raise SettingsError("--min-size is larger than --max-size")
    if s.training.limits.max_instance_images > MAX_INSTANCE_IMAGES:
        raise SettingsError(f"--training-max-images is at most {MAX_INSTANCE_IMAGES}")
    limits = replace(s.limits, default_steps=min(s.limits.default_steps, s.limits.max_steps))
    training = replace(s.training, stop_grace_s=s.server.grace_s)
    server = replace(s.server, max_receive_bytes=MAX_REQUEST_BYTES)
    return replace(s, limits=limits, training=training, server=server)
