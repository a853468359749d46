"""The only vision module that touches protobuf: validate and convert.

Requests become neutral :mod:`vision_service.domain` types (images decoded
with limits, options range-checked, every error naming its field); engine
events become ``ChatResponse`` messages.
"""

from __future__ import annotations

import json
import math
from typing import Any

from dreamsight.common.v1 import common_pb2
from dreamsight.vision.v1 import vision_pb2
from google.protobuf import duration_pb2

from dreamsight_server.errors import InvalidArgument, NotFound
from dreamsight_server.images import ImageLimits, decode_image
from dreamsight_server.tenancy import public_source
from vision_service.domain import (
    ChatDelta,
    ChatDone,
    ChatEvent,
    ChatInput,
    ChatMessage,
    FinishReason,
    ModelInfo,
    Role,
    SamplingOptions,
)

_ROLES = {
    vision_pb2.ROLE_SYSTEM: Role.SYSTEM,
    vision_pb2.ROLE_USER: Role.USER,
    vision_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
}
_FINISH = {
    FinishReason.STOP: vision_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: vision_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: vision_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: vision_pb2.FINISH_REASON_ERROR,
    FinishReason.GPU_BUDGET: vision_pb2.FINISH_REASON_GPU_BUDGET,
}
# (field, low, high, low inclusive, high inclusive)
_RANGES: tuple[tuple[str, float, float, bool, bool], ...] = (
    ("temperature", 0.0, 2.0, True, True),
    ("top_p", 0.0, 1.0, False, True),
    ("min_p", 0.0, 1.0, True, True),
    ("repetition_penalty", 0.0, 2.0, False, True),
    ("presence_penalty", -2.0, 2.0, True, True),
    ("frequency_penalty", -2.0, 2.0, True, True),
)
MAX_STOP_LENGTH = 256
MAX_TEXT_CHARS = 1_000_000


def chat_input(
    request: vision_pb2.ChatRequest,
    info: ModelInfo,
    limits: ImageLimits,
    max_stop_strings: int,
) -> ChatInput:
    """Validate a ChatRequest and convert it; raises InvalidArgument or NotFound."""
    if request.model and request.model != info.name:
        raise NotFound(f"model {request.model!r} is not served here (try {info.name!r})")
    if request.prompt:
        if request.messages:
            raise InvalidArgument("prompt", "set either prompt or messages, not both")
        if len(request.prompt) > MAX_TEXT_CHARS:
            raise InvalidArgument("prompt", f"longer than {MAX_TEXT_CHARS} characters")
        return ChatInput(
            model=info.name,
            messages=(),
            options=_options(request.options, max_stop_strings),
            request_id=request.request_id,
            prompt=request.prompt,
        )
    if not request.messages:
        raise InvalidArgument("messages", "at least one message (or a prompt) is required")
    total_images = sum(len(m.images) for m in request.messages)
    if total_images > info.max_images_per_request:
        raise InvalidArgument(
            "messages",
            f"{total_images} images, over the limit of {info.max_images_per_request} per request",
        )
    messages = tuple(_message(i, m, limits) for i, m in enumerate(request.messages))
    return ChatInput(
        model=info.name,
        messages=messages,
        options=_options(request.options, max_stop_strings),
        request_id=request.request_id,
    )


def _message(index: int, message: vision_pb2.Message, limits: ImageLimits) -> ChatMessage:
    where = f"messages[{index}]"
    role = _ROLES.get(message.role)
    if role is None:
        raise InvalidArgument(f"{where}.role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
    if not message.content.strip() and not message.images:
        raise InvalidArgument(f"{where}.content", "a message needs text, images, or both")
    if len(message.content) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"{where}.content", f"longer than {MAX_TEXT_CHARS} characters")
    if message.images and role is not Role.USER:
        raise InvalidArgument(f"{where}.images", "only user messages may carry images")
    images = tuple(
        decode_image(image.data, limits, f"{where}.images[{j}]")
        for j, image in enumerate(message.images)
    )
    return ChatMessage(role=role, text=message.content, images=images)


def _options(options: vision_pb2.ChatOptions, max_stop_strings: int) -> SamplingOptions:
    values: dict[str, Any] = {}
    for name, low, high, low_in, high_in in _RANGES:
        if not options.HasField(name):  # type: ignore[arg-type]
            continue
        value = float(getattr(options, name))
        ok = (
            math.isfinite(value)
            and (value >= low if low_in else value > low)
            and (value <= high if high_in else value < high)
        )
        if not ok:
            lo, hi = "[" if low_in else "(", "]" if high_in else ")"
            raise InvalidArgument(f"options.{name}", f"{value} is outside {lo}{low}, {high}{hi}")
        values[name] = value
    if options.HasField("max_tokens"):
        if options.max_tokens < 1:
            raise InvalidArgument("options.max_tokens", "must be at least 1")
        values["max_tokens"] = options.max_tokens
    if options.HasField("top_k"):
        if options.top_k < 0:
            raise InvalidArgument("options.top_k", f"{options.top_k} is negative (0 disables it)")
        values["top_k"] = options.top_k
    if options.HasField("seed"):
        values["seed"] = options.seed
    values["ignore_eos"] = options.ignore_eos
    values["min_tokens"] = options.min_tokens
    if options.HasField("max_tokens") and options.min_tokens > options.max_tokens:
        raise InvalidArgument(
            "options.min_tokens",
            f"{options.min_tokens} is more than max_tokens ({options.max_tokens})",
        )
    if len(options.stop) > max_stop_strings:
        raise InvalidArgument("options.stop", f"at most {max_stop_strings} stop strings")
    for i, stop in enumerate(options.stop):
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise InvalidArgument(f"options.stop[{i}]", f"must be 1 to {MAX_STOP_LENGTH} chars")
    fmt = options.response_format
    if fmt.type == vision_pb2.RESPONSE_FORMAT_TYPE_JSON:
        values["json_object"] = True
    elif fmt.type == vision_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        values["json_schema"] = _json_schema(fmt.json_schema)
    elif fmt.json_schema:
        raise InvalidArgument(
            "options.response_format.json_schema", "set only with RESPONSE_FORMAT_TYPE_JSON_SCHEMA"
        )
    return SamplingOptions(stop=tuple(options.stop), **values)


def _json_schema(text: str) -> dict[str, Any]:
    field = "options.response_format.json_schema"
    if not text:
        raise InvalidArgument(field, "required with RESPONSE_FORMAT_TYPE_JSON_SCHEMA")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidArgument(field, f"not valid JSON: {error.msg}") from None
    if not isinstance(schema, dict):
        raise InvalidArgument(field, "must be a JSON object")
    return schema


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def chat_response(event: ChatEvent) -> vision_pb2.ChatResponse:
    """One stream message for an engine event."""
    if isinstance(event, ChatDelta):
        return vision_pb2.ChatResponse(
            delta=event.text,
            completion_tokens=event.completion_tokens,
            prompt_tokens=event.prompt_tokens,
        )
    return vision_pb2.ChatResponse(final=chat_final(event))


def chat_final(done: ChatDone) -> vision_pb2.ChatFinal:
    """The final message of a stream."""
    return vision_pb2.ChatFinal(
        finish_reason=_FINISH[done.finish_reason],
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        time_to_first_token=_duration(done.time_to_first_token_s),
        usage=common_pb2.Usage(gpu_seconds=done.gpu_seconds, total_time=_duration(done.total_s)),
        text=done.text,
        model=done.model,
    )


def vision_model(info: ModelInfo) -> vision_pb2.VisionModel:
    """ListModels / GetModel entry."""
    return vision_pb2.VisionModel(
        name=info.name,
        context_length=info.context_length,
        max_images_per_request=info.max_images_per_request,
        demo=info.demo,
        origin=common_pb2.MODEL_ORIGIN_DEMO if info.demo else common_pb2.MODEL_ORIGIN_PRETRAINED,
        source=public_source(info.source),
    )
