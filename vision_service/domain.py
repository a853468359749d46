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
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass(frozen=True)
class ChatInput:
    """A validated chat request."""

    model: str
    messages: tuple[ChatMessage, ...]
    options: SamplingOptions = field(default_factory=SamplingOptions)
    request_id: str = ""
    prompt: str | None = None
    """Text continued as it stands, without the chat template (then no messages)."""

    @property
    def prompt_field(self) -> str:
        """The request field that holds the prompt, for errors."""
        return "messages" if self.prompt is None else "prompt"

    @property
    def text_chars(self) -> int:
        """Characters of text over all messages (or the raw prompt)."""
        return len(self.prompt or "") + sum(len(m.text) for m in self.messages)

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
    completion_tokens: int = 0
    """Tokens generated so far, this piece's included."""
    prompt_tokens: int = 0
    """Tokens in the prompt: set on the first piece only."""


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
