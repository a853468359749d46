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

    @property
    def fine_tuned(self) -> bool:
        """True for a tenant's fine-tuned model."""
        return self.origin is Origin.FINE_TUNED
