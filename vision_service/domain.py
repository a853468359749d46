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
    TOOL = "tool"


@dataclass(frozen=True)
class ToolCall:
    """A call of one of the request's tools."""

    id: str
    name: str
    arguments: str
    """A JSON object, as text (as the model wrote it)."""


@dataclass(frozen=True)
class ChatMessage:
    """One turn; images go before the text, as the chat template places them."""

    role: Role
    text: str
    images: tuple[Image, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    """On an assistant turn: the tools it called."""
    tool_call_id: str = ""
    """On a tool turn: the call it answers."""
    tool_name: str = ""
    """On a tool turn: the tool whose result it is."""


@dataclass(frozen=True)
class Tool:
    """A function the model may call."""

    name: str
    description: str
    parameters: dict[str, Any]
    """JSON Schema of its arguments."""


class ToolChoice(Enum):
    """Whether and how tools are called."""

    AUTO = "auto"
    """The model chooses (parsed by the service's tool call parser, if it has one)."""
    NONE = "none"
    REQUIRED = "required"
    FUNCTION = "function"
    """The one named tool (ToolUse.function)."""


@dataclass(frozen=True)
class ToolUse:
    """The request's tools and what it asks of them."""

    tools: tuple[Tool, ...]
    choice: ToolChoice = ToolChoice.AUTO
    function: str = ""
    """The tool to call, with ToolChoice.FUNCTION."""
    parallel: bool = True
    """False: at most one call."""
    chars: int = 0
    """Characters of the tools' names, descriptions and schemas (they go in the prompt)."""


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
    tool_use: ToolUse | None = None
    """The tools the model may call; None: no tools (or tool choice none)."""

    @property
    def prompt_field(self) -> str:
        """The request field that holds the prompt, for errors."""
        return "messages" if self.prompt is None else "prompt"

    @property
    def text_chars(self) -> int:
        """Characters of text over all messages (or the raw prompt), tools not
        included (they reach the prompt only where tool calling is on)."""
        calls = sum(len(c.arguments) for m in self.messages for c in m.tool_calls)
        return len(self.prompt or "") + calls + sum(len(m.text) for m in self.messages)

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
    TOOL_CALLS = "tool_calls"


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
    tool_calls: tuple[ToolCall, ...] = ()


ChatEvent = ChatDelta | ChatDone


@dataclass(frozen=True)
class ModelInfo:
    """What ListModels reports about the served model."""

    name: str
    context_length: int
    max_images_per_request: int
    demo: bool
    source: str
    tool_call_parser: str = ""
