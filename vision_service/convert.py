"""The only vision module that touches protobuf: validate and convert.

Requests become neutral :mod:`vision_service.domain` types (images decoded
with limits, options range-checked, every error naming its field); engine
events become ``ChatResponse`` messages.
"""

from __future__ import annotations

import json
import math
import re
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
    Tool,
    ToolCall,
    ToolChoice,
    ToolUse,
)

_ROLES = {
    vision_pb2.ROLE_SYSTEM: Role.SYSTEM,
    vision_pb2.ROLE_USER: Role.USER,
    vision_pb2.ROLE_ASSISTANT: Role.ASSISTANT,
    vision_pb2.ROLE_TOOL: Role.TOOL,
}
_CHOICES = {
    vision_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: ToolChoice.AUTO,
    vision_pb2.TOOL_CHOICE_MODE_AUTO: ToolChoice.AUTO,
    vision_pb2.TOOL_CHOICE_MODE_NONE: ToolChoice.NONE,
    vision_pb2.TOOL_CHOICE_MODE_REQUIRED: ToolChoice.REQUIRED,
    vision_pb2.TOOL_CHOICE_MODE_FUNCTION: ToolChoice.FUNCTION,
}
_FINISH = {
    FinishReason.STOP: vision_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: vision_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: vision_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: vision_pb2.FINISH_REASON_ERROR,
    FinishReason.GPU_BUDGET: vision_pb2.FINISH_REASON_GPU_BUDGET,
    FinishReason.TOOL_CALLS: vision_pb2.FINISH_REASON_TOOL_CALLS,
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
MAX_TOOLS = 128
"""Tools per request (OpenAI's limit), and tool calls per message."""
MAX_ID_CHARS = 256
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


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
        if request.tools:
            raise InvalidArgument("tools", "a raw prompt has no template to show tools in")
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
    options = _options(request.options, max_stop_strings)
    tool_use = _tool_use(request)
    if (
        tool_use is not None
        and tool_use.choice in (ToolChoice.REQUIRED, ToolChoice.FUNCTION)
        and (options.json_object or options.json_schema is not None)
    ):
        raise InvalidArgument(
            "options.response_format",
            "cannot be combined with a required or named tool choice: the tools' "
            "schemas constrain the reply",
        )
    return ChatInput(
        model=info.name,
        messages=messages,
        options=options,
        request_id=request.request_id,
        tool_use=tool_use,
    )


def _message(index: int, message: vision_pb2.Message, limits: ImageLimits) -> ChatMessage:
    where = f"messages[{index}]"
    role = _ROLES.get(message.role)
    if role is None:
        raise InvalidArgument(
            f"{where}.role", "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
        )
    calls = _past_calls(message, role, where)
    if not message.content.strip() and not message.images and not calls and role is not Role.TOOL:
        raise InvalidArgument(
            f"{where}.content", "a message needs text, images, or both (or tool calls)"
        )
    if len(message.content) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"{where}.content", f"longer than {MAX_TEXT_CHARS} characters")
    if message.images and role is not Role.USER:
        raise InvalidArgument(f"{where}.images", "only user messages may carry images")
    for name in ("tool_call_id", "tool_name"):
        value = getattr(message, name)
        if value and role is not Role.TOOL:
            raise InvalidArgument(f"{where}.{name}", "only tool messages answer tool calls")
        if len(value) > MAX_ID_CHARS:
            raise InvalidArgument(f"{where}.{name}", f"longer than {MAX_ID_CHARS} characters")
    images = tuple(
        decode_image(image.data, limits, f"{where}.images[{j}]")
        for j, image in enumerate(message.images)
    )
    return ChatMessage(
        role=role,
        text=message.content,
        images=images,
        tool_calls=calls,
        tool_call_id=message.tool_call_id,
        tool_name=message.tool_name,
    )


def _past_calls(message: vision_pb2.Message, role: Role, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's tool calls, each with JSON object arguments."""
    if not message.tool_calls:
        return ()
    if role is not Role.ASSISTANT:
        raise InvalidArgument(f"{where}.tool_calls", "only assistant messages make tool calls")
    if len(message.tool_calls) > MAX_TOOLS:
        raise InvalidArgument(f"{where}.tool_calls", f"at most {MAX_TOOLS} tool calls")
    calls = []
    for j, call in enumerate(message.tool_calls):
        param = f"{where}.tool_calls[{j}]"
        if not TOOL_NAME.fullmatch(call.name):
            raise InvalidArgument(f"{param}.name", "must be 1 to 64 letters, digits, _ or -")
        if len(call.id) > MAX_ID_CHARS:
            raise InvalidArgument(f"{param}.id", f"longer than {MAX_ID_CHARS} characters")
        _json_object(call.arguments_json or "{}", f"{param}.arguments_json")
        calls.append(ToolCall(call.id, call.name, call.arguments_json or "{}"))
    return tuple(calls)


def _tool_use(request: vision_pb2.ChatRequest) -> ToolUse | None:
    """The request's tools and tool choice; None when the model sees no tools."""
    mode = request.tool_choice.mode
    choice = _CHOICES.get(mode)
    if choice is None:
        raise InvalidArgument("tool_choice.mode", f"unknown tool choice mode {mode}")
    if not request.tools:
        if choice in (ToolChoice.REQUIRED, ToolChoice.FUNCTION):
            raise InvalidArgument("tool_choice", "a required or named tool choice needs tools")
        return None
    if len(request.tools) > MAX_TOOLS:
        raise InvalidArgument("tools", f"at most {MAX_TOOLS} tools")
    tools: dict[str, Tool] = {}
    chars = 0
    for i, tool in enumerate(request.tools):
        where = f"tools[{i}]"
        if not TOOL_NAME.fullmatch(tool.name):
            raise InvalidArgument(f"{where}.name", "must be 1 to 64 letters, digits, _ or -")
        if tool.name in tools:
            raise InvalidArgument(f"{where}.name", f"{tool.name!r} is named twice")
        parameters = _json_object(tool.parameters_json, f"{where}.parameters_json")
        tools[tool.name] = Tool(tool.name, tool.description, parameters)
        chars += len(tool.name) + len(tool.description) + len(tool.parameters_json)
    if choice is ToolChoice.NONE:
        return None
    function = request.tool_choice.function_name
    if choice is ToolChoice.FUNCTION and function not in tools:
        raise InvalidArgument(
            "tool_choice.function_name", f"{function!r} is not one of the request's tools"
        )
    if function and choice is not ToolChoice.FUNCTION:
        raise InvalidArgument(
            "tool_choice.function_name", "set only with TOOL_CHOICE_MODE_FUNCTION"
        )
    parallel = not request.HasField("parallel_tool_calls") or request.parallel_tool_calls
    return ToolUse(tuple(tools.values()), choice, function, parallel, chars)


def _json_object(text: str, field: str) -> dict[str, Any]:
    if not text:
        return {"type": "object", "properties": {}}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidArgument(field, f"not valid JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(field, "must be a JSON object")
    return value


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
    return _json_object(text, field)


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
        tool_calls=[
            vision_pb2.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments)
            for c in done.tool_calls
        ],
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
        tool_call_parser=info.tool_call_parser,
    )
