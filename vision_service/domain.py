"""Neutral request and result types of the vision engine (no protobuf here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image


class Role(Enum):
    """Who wrote a message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class ChatMessage:
    """One turn; images go before the text, as the chat template places them."""

    role: Role
    text: str
    images: tuple[Image, ...] = ()


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling options; None means the service's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    json_object: bool = False
    json_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChatInput:
    """A validated chat request."""

    model: str
    messages: tuple[ChatMessage, ...]
    options: SamplingOptions = field(default_factory=SamplingOptions)
    request_id: str = ""

    @property
    def image_count(self) -> int:
        """Images over all messages."""
        return sum(len(m.images) for m in self.messages)


class FinishReason(Enum):
    """Why generation ended."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"
    GPU_BUDGET = "gpu_budget"


@dataclass(frozen=True)
class ChatDelta:
    """The next piece of text."""

    text: str


@dataclass(frozen=True)
class ChatDone:
    """The summary that ends a chat."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    total_s: float
    gpu_seconds: float
    text: str
    model: str


ChatEvent = ChatDelta | ChatDone


@dataclass(frozen=True)
class ModelInfo:
    """What ListModels reports about the served model."""

    name: str
    context_length: int
    max_images_per_request: int
    demo: bool
    source: str
