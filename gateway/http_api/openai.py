"""OpenAI's REST API over the gateway core: /v1/chat/completions, /v1/models
and /v1/images/generations, so the OpenAI SDKs and the many tools built on
them work unchanged under dreamsight keys, tiers and metering.

Chat streams server-sent events when asked (``stream: true``), with usage in
a last chunk when ``stream_options.include_usage`` is set; images travel as
base64 data URLs. Image generation is the diffusion service's Generate,
answered as ``b64_json``. Errors are OpenAI's error object with the matching
HTTP status (429 carries Retry-After); a failure after the stream began is an
``error`` event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from dreamsight.common.v1 import common_pb2
from dreamsight.diffusion.v1 import diffusion_pb2
from dreamsight.vision.v1 import vision_pb2

from dreamsight_server.errors import DreamsightError, InvalidArgument
from gateway.calls import MeteredCall
from gateway.http_api import fields, frames
from gateway.http_api.body import (
    MAX_INT32,
    MAX_SEED,
    MAX_UINT32,
    decode_base64,
    get,
    get_int,
    json_schema_format,
    off_loop_if_large,
    read_json,
    stop_strings,
    tool_call,
    tools,
)
from gateway.http_api.errors import HttpError, error_middleware, http_error
from gateway.http_api.upstream import ChatStream, Upstream, relay_chat, reply_text

log = logging.getLogger(__name__)

PROTOCOL = "openai"
_ROLES = {
    "system": vision_pb2.ROLE_SYSTEM,
    "developer": vision_pb2.ROLE_SYSTEM,
    "user": vision_pb2.ROLE_USER,
    "assistant": vision_pb2.ROLE_ASSISTANT,
    "tool": vision_pb2.ROLE_TOOL,
}
_TOOL_CHOICES = {
    "auto": vision_pb2.TOOL_CHOICE_MODE_AUTO,
    "none": vision_pb2.TOOL_CHOICE_MODE_NONE,
    "required": vision_pb2.TOOL_CHOICE_MODE_REQUIRED,
}
_FINISH = {
    vision_pb2.FINISH_REASON_STOP: "stop",
    vision_pb2.FINISH_REASON_LENGTH: "length",
    vision_pb2.FINISH_REASON_GPU_BUDGET: "length",  # cut short: the clients' word for it
    vision_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
# OpenAI's sampling parameters, then vLLM's extensions that ChatOptions also has.
_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p")
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _error_body(error: HttpError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(error.status)
    if kind is None:
        kind = "server_error" if error.status >= 500 else "invalid_request_error"
    return {
        "error": {
            "message": error.message,
            "type": kind,
            "param": error.param,
            "code": error.code.name.lower(),
        }
    }


def _error_response(error: HttpError) -> web.Response:
    return web.json_response(_error_body(error), status=error.status, headers=error.headers())


def _data_url(url: Any, param: str) -> common_pb2.Image:
    """An image from a base64 data URL (the gateway fetches no remote URLs)."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise InvalidArgument(
            param, "only base64 data URLs (data:image/...;base64,...) are supported"
        )
    header, data = url.split(",", 1)
    return common_pb2.Image(
        data=decode_base64(data, param), mime_type=header[5:].removesuffix(";base64")
    )


def _content(value: Any, where: str) -> tuple[str, list[common_pb2.Image]]:
    """Text and images of a message's content: a string or a list of parts."""
    if value is None or isinstance(value, str):
        return value or "", []
    if not isinstance(value, list):
        raise InvalidArgument(where, "must be a string or a list of content parts")
    texts, images = [], []
    for j, part in enumerate(value):
        param = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(get(part, "text", str, f"{param}.text") or "")
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            images.append(_data_url(url, f"{param}.image_url.url"))
        else:
            raise InvalidArgument(f"{param}.type", "only text and image_url parts are supported")
    return "\n".join(texts), images


def _message(index: int, value: Any) -> vision_pb2.Message:
    where = f"messages[{index}]"
    if not isinstance(value, dict):
        raise InvalidArgument(where, "must be an object")
    role = _ROLES.get(value.get("role", ""))
    if role is None:
        if value.get("role") == "function":
            raise InvalidArgument(
                f"{where}.role", "legacy function results are not supported: send tool messages"
            )
        raise InvalidArgument(f"{where}.role", "must be system, developer, user, assistant or tool")
    text, images = _content(value.get("content"), f"{where}.content")
    calls = value.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidArgument(f"{where}.tool_calls", "must be a list of tool calls")
    return vision_pb2.Message(
        role=role,
        content=text,
        images=images,
        tool_calls=[tool_call(c, f"{where}.tool_calls[{j}]", True) for j, c in enumerate(calls)],
        tool_call_id=get(value, "tool_call_id", str, f"{where}.tool_call_id") or "",
    )


def _tool_choice(value: Any) -> vision_pb2.ToolChoice:
    if value is None:
        return vision_pb2.ToolChoice()
    if isinstance(value, str) and value in _TOOL_CHOICES:
        return vision_pb2.ToolChoice(mode=_TOOL_CHOICES[value])
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(name, str):
        return vision_pb2.ToolChoice(mode=vision_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name=name)
    raise InvalidArgument(
        "tool_choice",
        'must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
    )


def _response_format(value: Any) -> vision_pb2.ResponseFormat:
    if value is None:
        return vision_pb2.ResponseFormat()
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return vision_pb2.ResponseFormat(type=vision_pb2.RESPONSE_FORMAT_TYPE_TEXT)
    if kind == "json_object":
        return vision_pb2.ResponseFormat(type=vision_pb2.RESPONSE_FORMAT_TYPE_JSON)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return json_schema_format(schema, "response_format.json_schema.schema")
    raise InvalidArgument("response_format", "type must be text, json_object or json_schema")


def _model(body: dict[str, Any]) -> str:
    model = get(body, "model", str, "model")
    if not model:
        raise InvalidArgument("model", "you must provide a model parameter")
    return model


def _sampling(body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """ChatOptions fields from the sampling parameters both text endpoints share."""
    values: dict[str, Any] = {name: get(body, name, float, name) for name in _FLOATS}
    values["repetition_penalty"] = get(body, "repetition_penalty", float, "repetition_penalty")
    values["top_k"] = get_int(body, "top_k", "top_k", 0, MAX_INT32)
    values["seed"] = get_int(body, "seed", "seed", -MAX_SEED, MAX_SEED)
    values["max_tokens"] = max_tokens
    values["ignore_eos"] = get(body, "ignore_eos", bool, "ignore_eos")
    values["min_tokens"] = get_int(body, "min_tokens", "min_tokens", 0, MAX_UINT32)
    values["stop"] = stop_strings(body.get("stop"), "stop")
    return {k: v for k, v in values.items() if v is not None}


def _chat_request(body: dict[str, Any]) -> vision_pb2.ChatRequest:
    fields.OPENAI_CHAT.check(body)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "must be a non-empty list of messages")
    max_tokens = get_int(
        body, "max_completion_tokens", "max_completion_tokens", 1, MAX_UINT32
    ) or get_int(body, "max_tokens", "max_tokens", 1, MAX_UINT32)
    options = vision_pb2.ChatOptions(
        response_format=_response_format(body.get("response_format")),
        **_sampling(body, max_tokens),
    )
    return vision_pb2.ChatRequest(
        model=model,
        messages=[_message(i, m) for i, m in enumerate(messages)],
        options=options,
        tools=tools(body.get("tools"), "tools"),
        tool_choice=_tool_choice(body.get("tool_choice")),
        parallel_tool_calls=get(body, "parallel_tool_calls", bool, "parallel_tool_calls"),
    )


_COMPLETION_MAX_TOKENS = 16
"""OpenAI's default max_tokens for the legacy completions API."""


def _completion_request(body: dict[str, Any]) -> vision_pb2.ChatRequest:
    """POST /v1/completions' body: a raw prompt, continued without the chat template."""
    fields.OPENAI_COMPLETIONS.check(body)
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidArgument(
            "prompt", "must be a non-empty string (or a list of one; token ids are not accepted)"
        )
    max_tokens = get_int(body, "max_tokens", "max_tokens", 1, MAX_UINT32)
    options = vision_pb2.ChatOptions(**_sampling(body, max_tokens or _COMPLETION_MAX_TOKENS))
    return vision_pb2.ChatRequest(model=model, prompt=prompt, options=options)


def _usage(final: vision_pb2.ChatFinal) -> dict[str, int]:
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.prompt_tokens + final.completion_tokens,
    }


def _finish(final: vision_pb2.ChatFinal) -> str:
    return _FINISH.get(final.finish_reason, "stop")


def _tool_calls(final: vision_pb2.ChatFinal, indexed: bool = False) -> list[dict[str, Any]]:
    """The reply's tool calls as OpenAI's message (or, indexed, a stream's delta) has them."""
    return [
        {
            **({"index": i} if indexed else {}),
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments_json},
        }
        for i, c in enumerate(final.tool_calls)
    ]


def _chat_whole(head: dict[str, Any], messages: list[vision_pb2.ChatResponse]) -> dict[str, Any]:
    final = messages[-1].final
    text = reply_text(messages)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if final.tool_calls:
        message.update(content=text or None, tool_calls=_tool_calls(final))
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(final)}
    return {
        **head,
        "object": "chat.completion",
        "choices": [choice],
        "usage": _usage(final),
        "system_fingerprint": None,
    }


def _chat_piece(text: str | None, finish: str | None) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _tool_calls_piece(final: vision_pb2.ChatFinal) -> dict[str, Any]:
    """A stream's tool calls, whole, in the chunk before the last."""
    delta = {"tool_calls": _tool_calls(final, indexed=True)}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}


def _text_whole(head: dict[str, Any], messages: list[vision_pb2.ChatResponse]) -> dict[str, Any]:
    final = messages[-1].final
    choice = {"index": 0, "text": reply_text(messages), "logprobs": None}
    return {
        **head,
        "object": "text_completion",
        "choices": [{**choice, "finish_reason": _finish(final)}],
        "usage": _usage(final),
        "system_fingerprint": None,
    }


def _text_piece(text: str | None, finish: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


@dataclass(frozen=True)
class _Usage:
    """Usage in a stream: stream_options.include_usage and continuous_usage_stats."""

    last: bool
    """In a last chunk of its own (include_usage)."""
    running: bool
    """Also the figures so far on every chunk (vLLM's continuous_usage_stats)."""


@dataclass(frozen=True)
class _Shape:
    """How one of the two text endpoints words its replies."""

    id_prefix: str
    chunk_object: str
    whole: Callable[[dict[str, Any], list[vision_pb2.ChatResponse]], dict[str, Any]]
    piece: Callable[[str | None, str | None], dict[str, Any]]
    """A streamed choice: a text piece, or (text None) the end with its finish reason."""
    opening: dict[str, Any] | None = None
    """The choice sent before the first piece, if any."""


_CHAT = _Shape(
    "chatcmpl",
    "chat.completion.chunk",
    _chat_whole,
    _chat_piece,
    opening={"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None},
)  # fmt: skip
_COMPLETION = _Shape("cmpl", "text_completion", _text_whole, _text_piece)


def _model_entry(name: str, parent: str | None, kind: str, demo: bool) -> dict[str, Any]:
    """A /v1/models entry: OpenAI's fields, vLLM's (root, parent), and what it does."""
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "dreamsight",
        "root": name,
        "parent": parent,
        # What the model is for, where clients read it: chat or image generation.
        "kind": kind,
        "capabilities": ["chat", "vision"] if kind == "chat" else ["image_generation"],
        "demo": demo,
    }


def _chat_model(model: vision_pb2.VisionModel) -> dict[str, Any]:
    entry = _model_entry(model.name, None, "chat", model.demo)
    if model.tool_call_parser:  # it may call tools of its own choice (tool_choice auto)
        entry["capabilities"] = [*entry["capabilities"], "tools"]
    return {**entry, "max_model_len": model.context_length}


def _image_model(model: diffusion_pb2.DiffusionModel) -> dict[str, Any]:
    entry = _model_entry(model.name, model.base_model or None, "image", model.demo)
    # Open WebUI reads a model's kind from info.meta and keeps hidden models out of
    # its chat picker; image generation there is set up apart, by model name.
    meta = {
        "hidden": True,
        "description": "an image model: POST /v1/images/generations; it cannot chat",
        "capabilities": {"vision": False, "image_generation": True},
    }
    tune = _TUNES.get(model.kind)
    return {**entry, "tune": tune, "size_bytes": model.size_bytes, "info": {"meta": meta}}


_TUNES = {diffusion_pb2.TUNE_KIND_LORA: "lora", diffusion_pb2.TUNE_KIND_FULL: "full"}
"""A fine-tune's kind as /v1/models shows it (null for a base model)."""


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


class OpenAIApi:
    """The handlers: convert the body, call upstream through the core, convert back."""

    def __init__(self, upstream: Upstream) -> None:
        self._up = upstream

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self._text(request, _chat_request, _CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions: the legacy text API, the prompt continued as it stands."""
        return await self._text(request, _completion_request, _COMPLETION)

    async def _text(
        self,
        request: web.Request,
        convert: Callable[[dict[str, Any]], vision_pb2.ChatRequest],
        shape: _Shape,
    ) -> web.StreamResponse:
        await self._up.authenticate(request)
        body = await read_json(request, self._up.body_limits.chat)
        chat = await off_loop_if_large(request, convert, body)
        stream = get(body, "stream", bool, "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise InvalidArgument("stream_options", "must be an object")
        usage = get(options, "include_usage", bool, "stream_options.include_usage")
        running = get(
            options, "continuous_usage_stats", bool, "stream_options.continuous_usage_stats"
        )
        async with self._up.chat(request, PROTOCOL, chat) as call:
            # Upstream errors before the first message get a real HTTP status.
            first = await self._up.first_reply(request, PROTOCOL, call, chat.model)
            head = {
                "id": f"{shape.id_prefix}-{call.request_id}",
                "created": int(time.time()),
                "model": chat.model,
            }
            if not stream:
                completion = shape.whole(head, await call.rest(first))
                return web.json_response(completion, headers={"X-Request-Id": call.request_id})
            return await self._events(
                request, call, first, head, shape, _Usage(bool(usage), bool(usage and running))
            )

    async def _events(
        self,
        request: web.Request,
        call: MeteredCall[vision_pb2.ChatResponse],
        message: vision_pb2.ChatResponse | None,
        head: dict[str, Any],
        shape: _Shape,
        usage: _Usage,
    ) -> web.StreamResponse:
        """The reply as server-sent chunks, then [DONE]: the chunks of the messages
        already here (a client that lags) in one write."""
        chunks = frames.OpenAIChunks(
            {**head, "object": shape.chunk_object},
            shape.piece,
            last_usage=usage.last,
            running=usage.running,
        )
        prompt_tokens = 0

        def encode(message: vision_pb2.ChatResponse) -> bytes:
            nonlocal prompt_tokens
            if not message.HasField("final"):
                prompt_tokens = message.prompt_tokens or prompt_tokens
                return chunks.delta(message.delta, prompt_tokens, message.completion_tokens)
            final = message.final
            prompt_tokens = final.prompt_tokens
            out = b""
            if final.tool_calls:
                out += chunks.choice(
                    _tool_calls_piece(final), prompt_tokens, final.completion_tokens
                )
            end = shape.piece(None, _finish(final))
            out += chunks.choice(end, prompt_tokens, final.completion_tokens)
            if usage.last:
                out += chunks.usage(prompt_tokens, final.completion_tokens)
            return out

        response = ChatStream(headers={**_SSE_HEADERS, "X-Request-Id": call.request_id})
        await response.prepare(request)
        opening = b"" if shape.opening is None else chunks.choice(shape.opening, 0, 0)
        try:
            await relay_chat(call, message, encode, response, start=opening, end=_sse("[DONE]"))
        except (grpc.aio.AioRpcError, DreamsightError) as error:  # headers sent: an error event
            body = _error_body(http_error(error, self._up.core.errors, request))
            await response.write(_sse(body))
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models: chat models, then image models (the caller's own included)."""
        chat, image = await asyncio.gather(
            self._up.vision_models(request, PROTOCOL),
            self._up.diffusion_models(request, PROTOCOL),
            return_exceptions=True,
        )
        if isinstance(chat, BaseException) and isinstance(image, BaseException):
            raise chat  # nothing answered: say why the first did not
        for error in (chat, image):  # one backend down still lists the other's models
            if isinstance(error, BaseException):
                log.warning("a backend did not list its models: %r", error)
        data = [
            *(_chat_model(m) for m in ([] if isinstance(chat, BaseException) else chat)),
            *(_image_model(m) for m in ([] if isinstance(image, BaseException) else image)),
        ]
        return web.json_response({"object": "list", "data": data})

    async def images(self, request: web.Request) -> web.Response:
        """POST /v1/images/generations: Stable Diffusion, answered as base64 PNGs."""
        await self._up.authenticate(request)
        body = await read_json(request, self._up.body_limits.other)
        generate = await off_loop_if_large(request, _generate_request, body)
        async with self._up.generate(request, PROTOCOL, generate) as call:
            messages = await call.rest(await call.read())
            result = messages[-1].result
        data = [
            {
                "b64_json": base64.b64encode(i.image.data).decode(),
                "revised_prompt": None,
                "seed": i.seed,
            }
            for i in result.images
        ]
        return web.json_response(
            {"created": int(time.time()), "data": data, "output_format": "png"},
            headers={"X-Request-Id": call.request_id},
        )


def _generate_request(body: dict[str, Any]) -> diffusion_pb2.GenerateRequest:
    fields.OPENAI_IMAGES.check(body)
    prompt = get(body, "prompt", str, "prompt")
    if not prompt:
        raise InvalidArgument("prompt", "a prompt is required")
    if get(body, "response_format", str, "response_format") not in (None, "b64_json"):
        raise InvalidArgument("response_format", "only b64_json is supported")
    values: dict[str, Any] = {
        "num_images": get_int(body, "n", "n", 1, MAX_UINT32),
        # dreamsight's own knobs, for callers that pass extra_body
        "negative_prompt": get(body, "negative_prompt", str, "negative_prompt"),
        "steps": get_int(body, "steps", "steps", 1, MAX_UINT32),
        "guidance_scale": get(body, "guidance_scale", float, "guidance_scale"),
        "seed": get_int(body, "seed", "seed", 0, MAX_SEED),
        "scheduler": get(body, "scheduler", str, "scheduler"),
    }
    size = get(body, "size", str, "size")
    if size and size != "auto":
        width, _, height = size.partition("x")
        if not all(p.isascii() and p.isdigit() and len(p) <= 5 for p in (width, height)):
            raise InvalidArgument("size", 'must be "WIDTHxHEIGHT" in pixels, or "auto"')
        values["width"], values["height"] = int(width), int(height)
    return diffusion_pb2.GenerateRequest(
        model=get(body, "model", str, "model") or "",
        prompt=prompt,
        **{k: v for k, v in values.items() if v is not None},
    )


def app(upstream: Upstream) -> web.Application:
    """The /v1 sub-application."""
    api = OpenAIApi(upstream)
    sub = web.Application(middlewares=[error_middleware(_error_response, upstream.core.errors)])
    sub.add_routes(
        [
            web.post("/chat/completions", api.chat_completions),
            web.post("/completions", api.completions),
            web.get("/models", api.models),
            web.post("/images/generations", api.images),
        ]
    )
    return sub
