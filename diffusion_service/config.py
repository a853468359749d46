"""The diffusion service's one typed settings object.

Built in ``main()`` from flags, whose defaults come from
``DREAMSIGHT_DIFFUSION_*`` environment variables; nothing is read at import
time. The gateway secret is read from the environment or a file only, never
from a flag, so it does not show in process listings.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dreamsight_server.images import ImageLimits
from dreamsight_server.lifecycle import ServerOptions

DEMO_MODEL_DIR = Path(".dreamsight/models/sd-demo")
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

    min_size: int = 64
    max_size: int = 1024
    max_steps: int = 150
    default_steps: int = 25
    max_guidance_scale: float = 50.0
    default_guidance_scale: float = 7.5
    max_images: int = 4


@dataclass(frozen=True)
class TrainingLimits:
    """What one CreateTrainingJob request may ask for."""

    max_instance_images: int = MAX_INSTANCE_IMAGES
    max_train_steps: int = 5000
    max_learning_rate: float = 1e-3
    min_resolution: int = 64
    max_resolution: int = 1024
    max_class_images: int = 1000
    max_prior_loss_weight: float = 100.0
    images: ImageLimits = field(
        default_factory=lambda: ImageLimits(max_bytes=10 * 1024 * 1024, max_pixels=4096 * 4096)
    )


@dataclass(frozen=True)
class TrainingSettings:
    """DreamBooth jobs: where they live, how many run, on what."""

    store: Path = TRAINING_DIR / "jobs.sqlite3"
    """The SQLite job store (created on the first job)."""
    artifacts_dir: Path = TRAINING_DIR
    """Job work directories, the class-image cache and the fine-tuned models."""
    defaults_file: Path | None = None
    """The DreamBooth defaults (YAML); None is the packaged dreambooth_defaults.yaml."""
    concurrency: int = 1
    """Jobs training at once, each in its own worker process; 0 accepts and
    queues jobs but runs none (a replica that only serves generation)."""
    max_crashes: int = 2
    """Worker deaths (not shutdowns) a job survives by resuming; one more fails it."""
    accelerator: str = "auto"
    """Lightning's accelerator: auto, cpu, gpu."""
    devices: int = 1
    """Devices per job (Lightning's devices); GPU-seconds are devices times wall time."""
    strategy: str = "auto"
    """Lightning's strategy, e.g. ddp across several GPUs."""
    torch_threads: int = 1
    """Intra-op threads of each worker process."""
    stop_grace_s: float = 30.0
    """On shutdown: time for workers to checkpoint and exit before they are killed."""
    cancel_grace_s: float = 10.0
    """On cancel: time for a worker to stop after its step before it is killed."""
    limits: TrainingLimits = field(default_factory=TrainingLimits)


@dataclass(frozen=True)
class DiffusionSettings:
    """Everything the diffusion service needs to start."""

    models: tuple[BaseModel, ...] = (BaseModel("sd-demo", str(DEMO_MODEL_DIR)),)
    """Base models; the first is the default (used when a request names none)."""
    build_demo_model: bool = True
    """Build the tiny demo pipeline at a missing ``*-demo`` model directory."""
    max_loaded_models: int = 2
    """Pipelines kept in memory (least recently used evicted first)."""
    concurrency: int = 1
    """Generations running at once, each in its own worker thread."""
    max_queue: int = 8
    """Generations waiting for a worker; more get RESOURCE_EXHAUSTED."""
    torch_threads: int = 1
    """Intra-op threads of each worker (torch.set_num_threads)."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ..."""
    dtype: str = "auto"
    """``auto`` (float16 on CUDA, float32 on CPU), ``float32``, ``float16``, ``bfloat16``."""
    devices_per_worker: float = 1.0
    """Accelerators each request shares for GPU-second metering (g in g*dt/n)."""
    limits: Limits = field(default_factory=Limits)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    gateway_secret: str = ""
    """Shared secret the gateway sends; empty trusts the tenant header as is."""
    server: ServerOptions = field(
        default_factory=lambda: ServerOptions(
            port=50053, metrics_port=9103, max_receive_bytes=MAX_REQUEST_BYTES
        )
    )

    @property
    def default_model(self) -> BaseModel:
        """The model used when a request names none."""
        return self.models[0]


def _env(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(f"DREAMSIGHT_DIFFUSION_{name}", default)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> DiffusionSettings:
    """Settings from flags, defaulting to DREAMSIGHT_DIFFUSION_* variables."""
    env = os.environ if env is None else env
    d = DiffusionSettings()
    lim = d.limits
    p = argparse.ArgumentParser(
        prog="python -m diffusion_service", description="dreamsight diffusion"
    )
    default_models = _env(env, "MODELS", f"{d.models[0].name}={d.models[0].source}")
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        help="NAME=SOURCE or SOURCE (repeatable; the first is the default); "
        "env DREAMSIGHT_DIFFUSION_MODELS takes a comma-separated list",
    )
    p.add_argument(
        "--no-build-demo-model",
        dest="build_demo_model",
        action="store_false",
        default=_env(env, "BUILD_DEMO_MODEL", "1") not in ("0", "false", "no"),
    )
    p.add_argument(
        "--max-loaded-models", type=_positive, default=int(_env(env, "MAX_LOADED_MODELS", "2"))
    )
    p.add_argument("--concurrency", type=_positive, default=int(_env(env, "CONCURRENCY", "1")))
    p.add_argument("--max-queue", type=int, default=int(_env(env, "MAX_QUEUE", "8")))
    p.add_argument("--torch-threads", type=_positive, default=int(_env(env, "TORCH_THREADS", "1")))
    p.add_argument("--device", default=_env(env, "DEVICE", "auto"))
    p.add_argument("--dtype", default=_env(env, "DTYPE", "auto"))
    p.add_argument(
        "--devices-per-worker", type=float, default=float(_env(env, "DEVICES_PER_WORKER", "1"))
    )
    p.add_argument("--min-size", type=_positive, default=int(_env(env, "MIN_SIZE", "64")))
    p.add_argument("--max-size", type=_positive, default=int(_env(env, "MAX_SIZE", "1024")))
    p.add_argument("--max-steps", type=_positive, default=int(_env(env, "MAX_STEPS", "150")))
    p.add_argument("--default-steps", type=_positive, default=int(_env(env, "DEFAULT_STEPS", "25")))
    p.add_argument(
        "--max-guidance-scale",
        type=float,
        default=float(_env(env, "MAX_GUIDANCE_SCALE", str(lim.max_guidance_scale))),
    )
    p.add_argument(
        "--default-guidance-scale",
        type=float,
        default=float(_env(env, "DEFAULT_GUIDANCE_SCALE", str(lim.default_guidance_scale))),
    )
    p.add_argument("--max-images", type=_positive, default=int(_env(env, "MAX_IMAGES", "4")))
    p.add_argument(
        "--gateway-secret-file",
        type=Path,
        default=_env(env, "GATEWAY_SECRET_FILE", "") or None,
        help="file holding the gateway secret (or set DREAMSIGHT_DIFFUSION_GATEWAY_SECRET)",
    )
    t = d.training
    p.add_argument(
        "--training-store", type=Path, default=Path(_env(env, "TRAINING_STORE", str(t.store)))
    )
    p.add_argument(
        "--artifacts-dir", type=Path, default=Path(_env(env, "ARTIFACTS_DIR", str(t.artifacts_dir)))
    )
    p.add_argument(
        "--training-defaults",
        type=Path,
        default=_env(env, "TRAINING_DEFAULTS", "") or None,
        help="DreamBooth defaults YAML (default: the packaged dreambooth_defaults.yaml)",
    )
    p.add_argument(
        "--training-concurrency", type=int, default=int(_env(env, "TRAINING_CONCURRENCY", "1"))
    )
    p.add_argument(
        "--training-max-crashes", type=int, default=int(_env(env, "TRAINING_MAX_CRASHES", "2"))
    )
    p.add_argument("--training-accelerator", default=_env(env, "TRAINING_ACCELERATOR", "auto"))
    p.add_argument(
        "--training-devices", type=_positive, default=int(_env(env, "TRAINING_DEVICES", "1"))
    )
    p.add_argument("--training-strategy", default=_env(env, "TRAINING_STRATEGY", "auto"))
    p.add_argument(
        "--training-torch-threads",
        type=_positive,
        default=int(_env(env, "TRAINING_TORCH_THREADS", "1")),
    )
    p.add_argument(
        "--training-max-steps",
        type=_positive,
        default=int(_env(env, "TRAINING_MAX_STEPS", str(t.limits.max_train_steps))),
    )
    p.add_argument(
        "--training-max-images",
        type=_positive,
        default=int(_env(env, "TRAINING_MAX_IMAGES", str(t.limits.max_instance_images))),
    )
    p.add_argument("--host", default=_env(env, "HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env(env, "PORT", "50053")))
    p.add_argument("--metrics-port", type=int, default=int(_env(env, "METRICS_PORT", "9103")))
    p.add_argument("--grace-seconds", type=float, default=float(_env(env, "GRACE_SECONDS", "30")))
    a = p.parse_args(argv)
    raw_models = a.models or [m for m in default_models.split(",") if m.strip()]
    try:
        models = tuple(BaseModel.parse(m.strip()) for m in raw_models)
    except ValueError as error:
        p.error(str(error))
    if not models:
        p.error("at least one --model is required")
    if len({m.name for m in models}) != len(models):
        p.error("base model names must be unique")
    limits = Limits(
        min_size=a.min_size,
        max_size=a.max_size,
        max_steps=a.max_steps,
        default_steps=min(a.default_steps, a.max_steps),
        max_guidance_scale=a.max_guidance_scale,
        default_guidance_scale=a.default_guidance_scale,
        max_images=a.max_images,
    )
    if limits.min_size > limits.max_size:
        p.error("--min-size is larger than --max-size")
    secret = _env(env, "GATEWAY_SECRET", "")
    if a.gateway_secret_file is not None:
        secret = a.gateway_secret_file.read_text().strip()
    if a.training_max_images > MAX_INSTANCE_IMAGES:
        p.error(f"--training-max-images is at most {MAX_INSTANCE_IMAGES}")
    training = TrainingSettings(
        store=a.training_store,
        artifacts_dir=a.artifacts_dir,
        defaults_file=a.training_defaults,
        concurrency=max(0, a.training_concurrency),
        max_crashes=max(0, a.training_max_crashes),
        accelerator=a.training_accelerator,
        devices=a.training_devices,
        strategy=a.training_strategy,
        torch_threads=a.training_torch_threads,
        stop_grace_s=a.grace_seconds,
        limits=TrainingLimits(
            max_train_steps=a.training_max_steps,
            max_instance_images=a.training_max_images,
        ),
    )
    return DiffusionSettings(
        models=models,
        build_demo_model=a.build_demo_model,
        max_loaded_models=a.max_loaded_models,
        concurrency=a.concurrency,
        max_queue=max(0, a.max_queue),
        torch_threads=a.torch_threads,
        device=a.device,
        dtype=a.dtype,
        devices_per_worker=a.devices_per_worker,
        limits=limits,
        training=training,
        gateway_secret=secret,
        server=ServerOptions(
            host=a.host,
            port=a.port,
            metrics_port=a.metrics_port,
            grace_s=a.grace_seconds,
            max_receive_bytes=MAX_REQUEST_BYTES,
        ),
    )
