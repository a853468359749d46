"""Typed results of the client: plain dataclasses, the raw protobuf one attribute away."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypedDict

ImageInput = str | os.PathLike[str] | bytes | Any
"""An image: a file path, encoded bytes, or a PIL image (PIL is optional)."""


@dataclass(frozen=True)
class ToolCall:
    """A call of one of the request's tools, as the model made it."""

    id: str
    name: str
    arguments: str
    """A JSON object, as text (incomplete when the reply was cut short)."""

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as a dict (raises ValueError when they are not a JSON object)."""
        value = json.loads(self.arguments)
        if not isinstance(value, dict):
            raise ValueError(f"the arguments of {self.name} are not a JSON object")
        return value


@dataclass(frozen=True)
class Tool:
    """A function the model may call."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    """JSON Schema of its arguments."""


ToolChoice = Literal["auto", "none", "required"] | Tool
"""Whether tools are called: auto (the model chooses), none, required, or
this one tool."""


class MessageDict(TypedDict, total=False):
    """A chat message as a dict, as ollama-python takes it."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    images: Sequence[ImageInput]
    tool_calls: Sequence[ToolCall]
    tool_call_id: str
    tool_name: str


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: Sequence[ImageInput] = ()
    tool_calls: Sequence[ToolCall] = ()
    """On an assistant turn: the tool calls it made (ChatResponse.tool_calls)."""
    tool_call_id: str = ""
    """On a tool turn: the call whose result this is."""
    tool_name: str = ""
    """On a tool turn: the tool whose result this is."""


MessageLike = Message | MessageDict | str
"""A message, a dict, or a plain string (a user message)."""


class Options(TypedDict, total=False):
    """Sampling options for chat (all optional)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    stop: Sequence[str]
    seed: int
    ignore_eos: bool
    """Keep generating past end-of-sequence, up to max_tokens."""
    min_tokens: int
    """Generate at least this many tokens before the reply may end."""
    format: Literal["text", "json"] | dict[str, Any]
    """"json" for any JSON value, or a JSON Schema dict the reply must match."""


@dataclass(frozen=True)
class ChatResponse:
    """A finished chat reply with its statistics."""

    text: str
    finish_reason: str
    """"stop", "length", "tool_calls", "gpu_budget", "cancelled" or "error"."""
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float
    total_time: float
    gpu_seconds: float
    model: str
    raw: Any = field(repr=False, default=None)
    """The ChatFinal protobuf."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The tools the model called, in order."""


@dataclass(frozen=True)
class ChatChunk:
    """One streamed piece: a text delta, or (``done``) the final response."""

    text: str
    done: bool = False
    response: ChatResponse | None = None
    raw: Any = field(repr=False, default=None)


@dataclass(frozen=True)
class GeneratedImage:
    """One image: PNG bytes and the seed that reproduces it."""

    png: bytes
    seed: int

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the PNG to path; return it."""
        target = Path(path)
        target.write_bytes(self.png)
        return target

    def to_pil(self) -> Any:
        """The image as a PIL image (needs Pillow)."""
        import io

        from PIL import Image

        return Image.open(io.BytesIO(self.png))


@dataclass(frozen=True)
class GenerateResult:
    """Generated images and their cost."""

    images: tuple[GeneratedImage, ...]
    gpu_seconds: float
    total_time: float
    model: str
    raw: Any = field(repr=False, default=None)


@dataclass(frozen=True)
class GenerateProgress:
    """A denoising step finished."""

    step: int
    total_steps: int


GenerateEvent = GenerateProgress | GenerateResult


@dataclass(frozen=True)
class TrainingJob:
    """A DreamBooth fine-tuning job."""

    job_id: str
    state: str
    """"queued", "running", "succeeded", "failed" or "cancelled"."""
    step: int
    total_steps: int
    model: str
    reason: str
    gpu_seconds: float
    created: datetime | None
    ended: datetime | None
    raw: Any = field(repr=False, default=None)

    @property
    def done(self) -> bool:
        """True once the job reached a terminal state."""
        return self.state in ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class JobEvent:
    """One event of a training job (see ``kind``)."""

    kind: str
    """"queued", "class_images", "training_step", "checkpoint_saved",
    "validation_image", "succeeded", "failed" or "cancelled"."""
    state: str
    time: datetime | None
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    learning_rate: float = 0.0
    eta_seconds: float = 0.0
    done: int = 0
    total: int = 0
    model: str = ""
    reason: str = ""
    image_png: bytes = b""
    raw: Any = field(repr=False, default=None)


@dataclass(frozen=True)
class Model:
    """A model a caller may use."""

    name: str
    kind: Literal["vision", "diffusion"]
    demo: bool
    origin: str
    """"pretrained", "demo" or "fine_tuned"."""
    source: str = ""
    context_length: int = 0
    max_images_per_request: int = 0
    base_model: str = ""
    tune: Literal["", "lora", "full"] = ""
    """A fine-tuned image model's kind of tune; empty for base models."""
    size_bytes: int = 0
    """Bytes on disk of what a fine-tune exported; 0 for base models."""
    raw: Any = field(repr=False, default=None)


@dataclass(frozen=True)
class UsageWindow:
    """GPU-second use of one sliding window."""

    name: str
    limit_gpu_seconds: float
    used_gpu_seconds: float
    resets_at: datetime | None


@dataclass(frozen=True)
class Usage:
    """The caller's tier, limits and use."""

    tenant: str
    tier: str
    max_concurrent_requests: int
    requests_in_flight: int
    max_concurrent_training_jobs: int
    training_jobs_running: int
    windows: tuple[UsageWindow, ...]
    raw: Any = field(repr=False, default=None)


@dataclass(frozen=True)
class ApiKey:
    """A stored API key (never its secret)."""

    key_id: str
    tenant: str
    tier: str
    description: str
    created: datetime | None
    revoked: datetime | None


@dataclass(frozen=True)
class CreatedKey:
    """A new key and its secret, shown once."""

    key: ApiKey
    secret: str
