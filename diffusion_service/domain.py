"""Neutral request and result types of the diffusion engine (no protobuf here)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Scheduler(Enum):
    """The schedulers a request may pick; the values are the wire names."""

    DDIM = "ddim"
    EULER = "euler"
    EULER_ANCESTRAL = "euler_ancestral"
    DPMPP_2M = "dpmpp_2m"
    PNDM = "pndm"


class TuneKind(Enum):
    """The kind of a fine-tune; the values are what job params store."""

    LORA = "lora"
    """Low-rank adapters, served on the loaded base pipeline."""
    FULL = "full"
    """Every UNet weight (and the text encoder's when trained)."""


class Origin(Enum):
    """Where a model's weights came from."""

    PRETRAINED = "pretrained"
    DEMO = "demo"
    FINE_TUNED = "fine_tuned"


@dataclass(frozen=True)
class GenerateInput:
    """A Generate request after the model-independent checks.

    None means "the model's or the service's default"; the engine resolves
    those once it knows the model.
    """

    model: str
    """Empty means the service's default base model."""
    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: Scheduler | None = None
    """None keeps the model's own scheduler."""
    seed: int | None = None
    """Seed of image 0; image i uses seed + i. None picks one at random."""
    num_images: int = 1
    request_id: str = ""


@dataclass(frozen=True)
class Progress:
    """A denoising step finished."""

    step: int
    total_steps: int


@dataclass(frozen=True)
class Image:
    """One generated image."""

    png: bytes
    seed: int


@dataclass(frozen=True)
class GenerateDone:
    """The images and their cost; always the last event."""

    images: tuple[Image, ...]
    gpu_seconds: float
    total_s: float
    model: str


GenerateEvent = Progress | GenerateDone


@dataclass(frozen=True)
class ModelInfo:
    """What ListModels reports about one model, plus who owns it."""

    name: str
    origin: Origin
    demo: bool
    default_width: int
    default_height: int
    source: str = ""
    """The directory or hub id; reported for base models only."""
    base_model: str = ""
    job_id: str = ""
    owner: str = ""
    """The owning tenant of a fine-tuned model; empty for base models."""
    kind: TuneKind | None = None
    """A fine-tuned model's kind; None for base models."""
    size_bytes: int = 0
    """Bytes on disk of what a fine-tune exported; 0 for base models."""

    @property
    def fine_tuned(self) -> bool:
        """True for a tenant's fine-tuned model."""
        return self.origin is Origin.FINE_TUNED


class JobState(Enum):
    """The states of a training job; the values are stored in the job store."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True once the job has ended."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class TrainingInput:
    """A CreateTrainingJob request after the model-independent checks.

    None means "the defaults file's value"; the training engine resolves
    those once it knows the base model.
    """

    base_model: str
    """Empty means the service's default base model."""
    instance_images: tuple[bytes, ...]
    """The encoded images as sent (each already decoded once, within limits)."""
    instance_prompt: str
    class_prompt: str = ""
    num_class_images: int = 0
    prior_loss_weight: float | None = None
    max_train_steps: int | None = None
    learning_rate: float | None = None
    train_text_encoder: bool = False
    resolution: int | None = None
    seed: int = 0
    checkpoint_interval: int | None = None
    validation_prompt: str = ""
    output_model_name: str = ""
    """Empty lets the service choose."""
    client_request_id: str = ""
    kind: TuneKind = TuneKind.LORA
    rank: int | None = None
    lora_alpha: float | None = None
    """None takes the rank."""
    lora_layers: tuple[str, ...] = ()
    """Empty takes the defaults file's."""
    train_text_encoder_lora: bool = False


@dataclass(frozen=True)
class TrainingSettingsView:
    """A job's settings as reported back (resolved, images omitted)."""

    base_model: str
    instance_prompt: str
    class_prompt: str
    num_class_images: int
    prior_loss_weight: float
    max_train_steps: int
    learning_rate: float
    train_text_encoder: bool
    resolution: int
    seed: int
    checkpoint_interval: int
    validation_prompt: str
    output_model_name: str
    kind: TuneKind = TuneKind.FULL
    rank: int = 0
    lora_alpha: float = 0.0
    lora_layers: tuple[str, ...] = ()
    train_text_encoder_lora: bool = False


@dataclass(frozen=True)
class TrainingJobInfo:
    """A training job as the service reports it."""

    job_id: str
    owner: str
    state: JobState
    settings: TrainingSettingsView
    step: int
    create_time: float
    """Seconds since the epoch."""
    end_time: float | None
    model: str
    """The fine-tuned model, once the job succeeded."""
    reason: str
    gpu_seconds: float

    @property
    def total_s(self) -> float:
        """Wall time from creation to the end (or to now)."""
        import time

        end = self.end_time if self.end_time is not None else time.time()
        return max(0.0, end - self.create_time)


@dataclass(frozen=True)
class JobQueued:
    """The job waits for a worker."""

    position: int


@dataclass(frozen=True)
class ClassImagesProgress:
    """Class-prior images ready so far (cached ones count at once)."""

    done: int
    total: int


@dataclass(frozen=True)
class TrainingStep:
    """An optimizer step finished."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    eta_s: float


@dataclass(frozen=True)
class CheckpointSaved:
    """A checkpoint of this step was written."""

    step: int


@dataclass(frozen=True)
class ValidationImage:
    """An image rendered from the validation prompt."""

    step: int
    png: bytes


@dataclass(frozen=True)
class JobSucceeded:
    """The model is registered and ready."""

    model: str


@dataclass(frozen=True)
class JobFailed:
    """The job stopped with an error."""

    reason: str


@dataclass(frozen=True)
class JobCancelled:
    """The owner cancelled the job."""


JobEventPayload = (
    JobQueued
    | ClassImagesProgress
    | TrainingStep
    | CheckpointSaved
    | ValidationImage
    | JobSucceeded
    | JobFailed
    | JobCancelled
)


@dataclass(frozen=True)
class JobEvent:
    """One event in a job's history."""

    seq: int
    """1, 2, ... within the job."""
    time: float
    """Seconds since the epoch."""
    state: JobState
    """The job's state after the event."""
    payload: JobEventPayload

    @property
    def terminal(self) -> bool:
        """True for the job's last event."""
        return isinstance(self.payload, JobSucceeded | JobFailed | JobCancelled)
