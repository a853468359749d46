"""DreamBooth parameters: the YAML defaults, a job's resolved settings, and
what a worker process is told at launch. No torch here.

:class:`Defaults` is read once from ``diffusion_service/dreambooth_defaults.yaml``
(or the operator's copy); :class:`JobParams` is one job's settings after its
TrainingSpec overrode those defaults, fixed at creation and stored with the
job, so a resumed job trains with the settings it started with even when the
defaults file changed in between. :class:`WorkerRuntime` is decided at each
launch (devices, threads, paths) and may differ between attempts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

DEFAULTS_FILE = "dreambooth_defaults.yaml"
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LORA = "lora"
FULL = "full"
TUNE_KINDS = (LORA, FULL)
UNET_LORA_LAYERS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_k_proj",
    "add_v_proj",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "conv",
)
"""UNet module names a job may put adapters on (Stable Diffusion's; peft matches
a name as the last part of a module's path, so ``conv`` is the down- and
upsamplers' convolution, not ``conv1``, ``conv_in`` or ``conv_out``)."""
TEXT_ENCODER_LORA_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""Where text-encoder adapters go (the diffusers LoRA script's choice)."""

T = TypeVar("T")


@dataclass(frozen=True)
class TrainerOptions:
    """Trainer settings no TrainingSpec field reaches (operator-only)."""

    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 50
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    offset_noise: float = 0.0
    snr_gamma: float | None = None
    random_flip: bool = True
    cache_latents: bool = True
    keep_checkpoints: int = 2
    log_every_n_steps: int = 1

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        _at_least("trainer.train_batch_size", self.train_batch_size, 1)
        _at_least("trainer.gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _at_least("trainer.lr_warmup_steps", self.lr_warmup_steps, 0)
        _at_least("trainer.keep_checkpoints", self.keep_checkpoints, 1)
        _at_least("trainer.log_every_n_steps", self.log_every_n_steps, 1)
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"trainer.lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"trainer.mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be in [0, 1)")
        for name in ("adam_weight_decay", "adam_epsilon", "max_grad_norm", "offset_noise"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"trainer.{name} must be a finite number >= 0")
        if self.snr_gamma is not None and not (
            math.isfinite(self.snr_gamma) and self.snr_gamma > 0
        ):
            raise ValueError("trainer.snr_gamma must be a positive number or null")


@dataclass(frozen=True)
class DrawSettings:
    """How class-prior or validation images are drawn (not the vision service's
    SamplingOptions, which shape a chat reply)."""

    batch_size: int = 4
    inference_steps: int = 50
    guidance_scale: float = 7.5
    num_images: int = 1
    """Validation images per checkpoint (unused for class images)."""

    def check(self, where: str) -> None:
        """Raise ValueError naming the first bad setting."""
        _at_least(f"{where}.batch_size", self.batch_size, 1)
        _at_least(f"{where}.inference_steps", self.inference_steps, 1)
        _at_least(f"{where}.num_images", self.num_images, 1)
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"{where}.guidance_scale must be a finite number >= 0")


@dataclass(frozen=True)
class LoraDefaults:
    """What a LoRA job takes when its TrainingSpec leaves a LoRA field unset."""

    rank: int = 4
    learning_rate: float = 1e-4
    """LoRA trains far fewer weights and takes a higher rate (the script's README)."""
    lora_layers: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        _at_least("lora.rank", self.rank, 1)
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError("lora.learning_rate must be a positive number")
        unknown = [m for m in self.lora_layers if m not in UNET_LORA_LAYERS]
        if not self.lora_layers or unknown:
            raise ValueError(f"lora.lora_layers must be some of {', '.join(UNET_LORA_LAYERS)}")


@dataclass(frozen=True)
class Defaults:
    """The defaults file: job-level defaults and operator-only settings."""

    max_train_steps: int = 400
    learning_rate: float = 5e-6
    prior_loss_weight: float = 1.0
    resolution: int | None = None
    checkpoint_interval: int = 100
    lora: LoraDefaults = field(default_factory=LoraDefaults)
    trainer: TrainerOptions = field(default_factory=TrainerOptions)
    class_images: DrawSettings = field(default_factory=DrawSettings)
    validation: DrawSettings = field(
        default_factory=lambda: DrawSettings(batch_size=1, inference_steps=25)
    )

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        _at_least("max_train_steps", self.max_train_steps, 1)
        _at_least("checkpoint_interval", self.checkpoint_interval, 1)
        if self.resolution is not None:
            _at_least("resolution", self.resolution, 8)
            if self.resolution % 8:
                raise ValueError("resolution must be a multiple of 8")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError("learning_rate must be a positive number")
        if not (math.isfinite(self.prior_loss_weight) and self.prior_loss_weight > 0):
            raise ValueError("prior_loss_weight must be a positive number")
        self.lora.check()
        self.trainer.check()
        self.class_images.check("class_images")
        self.validation.check("validation")


def load_defaults(path: Path | None = None) -> Defaults:
    """Read and check a defaults file (the packaged one when path is None).

    Raises ValueError for an unknown key, a wrong type or a bad value, so an
    operator's typo stops the service at start-up instead of being ignored.
    """
    import yaml

    if path is None:
        text = resources.files("diffusion_service").joinpath(DEFAULTS_FILE).read_text()
        where = DEFAULTS_FILE
    else:
        text = path.read_text()
        where = str(path)
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping at the top")
    defaults = from_dict(Defaults, data, where)
    defaults.check()
    return defaults


@dataclass(frozen=True)
class JobParams:
    """One job's settings after its TrainingSpec overrode the defaults."""

    base_model: str
    instance_prompt: str
    class_prompt: str
    validation_prompt: str
    num_class_images: int
    """0 disables prior preservation."""
    prior_loss_weight: float
    max_train_steps: int
    learning_rate: float
    train_text_encoder: bool
    resolution: int
    seed: int
    checkpoint_interval: int
    num_instance_images: int
    kind: str = FULL
    """``lora`` or ``full``; FULL by default for jobs stored before LoRA existed
    (a new job's kind is always resolved explicitly)."""
    rank: int = 0
    """LoRA rank (0 for a full tune)."""
    lora_alpha: float = 0.0
    """LoRA scaling alpha (0 for a full tune)."""
    lora_layers: tuple[str, ...] = ()
    """UNet modules with adapters (empty for a full tune)."""
    train_text_encoder_lora: bool = False
    trainer: TrainerOptions = field(default_factory=TrainerOptions)
    class_images: DrawSettings = field(default_factory=DrawSettings)
    validation: DrawSettings = field(default_factory=DrawSettings)

    @property
    def with_prior(self) -> bool:
        """Whether class-prior preservation is on."""
        return self.num_class_images > 0

    @property
    def lora(self) -> bool:
        """Whether the job trains LoRA adapters (else every UNet weight)."""
        return self.kind == LORA

    @property
    def warmup_steps(self) -> int:
        """Warm-up steps, capped at a quarter of the job."""
        return min(self.trainer.lr_warmup_steps, self.max_train_steps // 4)

    def to_json(self) -> str:
        """A JSON object (stored with the job)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobParams:
        """The inverse of :meth:`to_json`."""
        return from_dict(cls, json.loads(text), "job params")


@dataclass(frozen=True)
class WorkerRuntime:
    """What one launch of a job's worker process needs besides the params."""

    job_id: str
    base_source: str
    """The base model's diffusers directory or hub id."""
    instance_dir: str
    class_cache_dir: str
    export_dir: str
    """Where the finished pipeline is written (the service moves it into place)."""
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    torch_threads: int = 1


@dataclass(frozen=True)
class WorkerSpec:
    """The ``job.json`` a worker reads: params and runtime."""

    params: JobParams
    runtime: WorkerRuntime

    def write(self, path: Path) -> None:
        """Write atomically (a worker never reads half a file)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> WorkerSpec:
        """Read a spec written by :meth:`write`."""
        return from_dict(cls, json.loads(path.read_text()), str(path))


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build a (nested) frozen dataclass from plain data, strictly.

    Unknown keys, missing required keys and wrong types raise ValueError with
    the dotted key; ints are accepted where floats are expected.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        values[name] = _coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"{where}: {error}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)  # type: ignore[arg-type]
    if origin is tuple:
        (inner, _) = typing.get_args(hint)  # tuple[X, ...]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise ValueError(f"{where}: unsupported type {hint!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name} must be at least {low}")
