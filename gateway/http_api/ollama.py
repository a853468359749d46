"""Ollama's REST API over the gateway core: /api/chat, /api/generate, /api/tags,
/api/ps, /api/show and /api/version, so ollama-python, Open WebUI and other
Ollama tools work unchanged under dreamsight keys, tiers and metering.

Chat and generate stream NDJSON by default (``"stream": false`` answers one
object); the last object has ``done: true`` and Ollama's counters, durations
in nanoseconds. Errors are ``{"error": "..."}`` with Ollama's statuses, and a
failure after the stream began is one more line of that shape.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from aiohttp import web
from dreamsight.common.v1 import common_pb2
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

PROTOCOL = "ollama"
VERSION = "0.12.0"
"""The Ollama API version these endpoints follow (tools check it)."""
_ROLES = {
    "system": vision_pb2.ROLE_SYSTEM,
    "user": vision_pb2.ROLE_USER,
    "assistant": vision_pb2.ROLE_ASSISTANT,
    "tool": vision_pb2.ROLE_TOOL,
}
_DONE_REASONS = {
    vision_pb2.FINISH_REASON_TOOL_CALLS: "stop",  # Ollama's word: the turn ended
    vision_pb2.FINISH_REASON_STOP: "stop",
    vision_pb2.FINISH_REASON_LENGTH: "length",
    vision_pb2.FINISH_REASON_GPU_BUDGET: "length",  # cut short: the clients' word for it
}
# Ollama option -> ChatOptions field. Which options apply and which are refused is
# gateway.http_api.fields' table (runner settings such as num_ctx apply as the
# served model's own).
_FLOAT_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
_EPOCH = "1970-01-01T00:00:00Z"
_NEVER = "2318-11-30T00:00:00Z"  # what Ollama reports for a model kept loaded forever


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _error_response(error: HttpError) -> web.Response:
    return web.json_response({"error": error.message}, status=error.status, headers=error.headers())


def _model_name(body: dict[str, Any]) -> str:
    name = get(body, "model", str, "model") or get(body, "name", str, "name")
    if not name:
        raise InvalidArgument("model", "model is required")
    return name.removesuffix(":latest")  # Ollama's default tag names the one model


def _images(value: Any, param: str) -> list[common_pb2.Image]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(param, "must be a list of base64 strings")
    return [common_pb2.Image(data=decode_base64(v, f"{param}[{i}]")) for i, v in enumerate(value)]


def _message(index: int, value: Any) -> vision_pb2.Message:
    where = f"messages[{index}]"
    if not isinstance(value, dict):
        raise InvalidArgument(where, "must be an object")
    role = _ROLES.get(value.get("role", ""))
    if role is None:
        raise InvalidArgument(f"{where}.role", "must be system, user, assistant or tool")
    calls = value.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidArgument(f"{where}.tool_calls", "must be a list of tool calls")
    return vision_pb2.Message(
        role=role,
        content=get(value, "content", str, f"{where}.content") or "",
        images=_images(value.get("images"), f"{where}.images"),
        tool_calls=[tool_call(c, f"{where}.tool_calls[{j}]", False) for j, c in enumerate(calls)],
        tool_name=get(value, "tool_name", str, f"{where}.tool_name") or "",
    )


def _options(body: dict[str, Any]) -> vision_pb2.ChatOptions:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidArgument("options", "must be an object")
    values: dict[str, Any] = {}
    for name, target in _FLOAT_OPTIONS.items():
        values[target] = get(options, name, float, f"options.{name}")
    values["top_k"] = get_int(options, "top_k", "options.top_k", 0, MAX_INT32)
    values["ignore_eos"] = get(options, "ignore_eos", bool, "options.ignore_eos")
    values["min_tokens"] = get_int(options, "min_tokens", "options.min_tokens", 0, MAX_UINT32)
    seed = get_int(options, "seed", "options.seed", -MAX_SEED, MAX_SEED)
    values["seed"] = seed if seed is not None and seed >= 0 else None  # -1: a random seed
    predict = get_int(options, "num_predict", "options.num_predict", -2, MAX_UINT32)
    if predict is not None and predict > 0:  # -1 (until done) and -2 (fill the context): unset
        values["max_tokens"] = predict
    chat = vision_pb2.ChatOptions(
        stop=stop_strings(options.get("stop"), "options.stop"),
        **{k: v for k, v in values.items() if v is not None},
    )
    fmt = body.get("format")
    if fmt == "json":
        chat.response_format.type = vision_pb2.RESPONSE_FORMAT_TYPE_JSON
    elif isinstance(fmt, dict):
        chat.response_format.CopyFrom(json_schema_format(fmt, "format"))
    elif fmt not in (None, ""):
        raise InvalidArgument("format", 'must be "json" or a JSON schema object')
    return chat


def _chat_request(body: dict[str, Any]) -> vision_pb2.ChatRequest:
    """POST /api/chat's body as a ChatRequest."""
    fields.OLLAMA_CHAT.check(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidArgument("messages", "must be a list of messages")
    return vision_pb2.ChatRequest(
        model=_model_name(body),
        messages=[_message(i, m) for i, m in enumerate(messages)],
        options=_options(body),
        tools=tools(body.get("tools"), "tools"),
    )


def _generate_request(body: dict[str, Any]) -> vision_pb2.ChatRequest | None:
    """POST /api/generate's body as a ChatRequest; None for the "load the model"
    call (no prompt, no images)."""
    fields.OLLAMA_GENERATE.check(body)
    model = _model_name(body)
    prompt = get(body, "prompt", str, "prompt") or ""
    images = _images(body.get("images"), "images")
    if not prompt and not images:
        return None
    if get(body, "raw", bool, "raw"):  # the prompt as it stands, no template
        if images or body.get("system"):
            raise InvalidArgument("raw", "a raw prompt carries no images and no system prompt")
        return vision_pb2.ChatRequest(model=model, prompt=prompt, options=_options(body))
    messages = []
    if system := get(body, "system", str, "system"):
        messages.append(vision_pb2.Message(role=vision_pb2.ROLE_SYSTEM, content=system))
    messages.append(vision_pb2.Message(role=vision_pb2.ROLE_USER, content=prompt, images=images))
    return vision_pb2.ChatRequest(model=model, messages=messages, options=_options(body))


def _done(final: vision_pb2.ChatFinal) -> dict[str, Any]:
    total = final.usage.total_time.ToNanoseconds()
    first = final.time_to_first_token.ToNanoseconds()
    return {
        "done": True,
        "done_reason": _DONE_REASONS.get(final.finish_reason, "stop"),
        "total_duration": total,
        "load_duration": 0,  # models stay loaded
        "prompt_eval_count": final.prompt_tokens,
        "prompt_eval_duration": first,
        "eval_count": final.completion_tokens,
        "eval_duration": max(0, total - first),
    }


def _details(model: vision_pb2.VisionModel) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "dreamsight",
        "family": "llava",
        "families": ["llava", "clip"],
        "parameter_size": "demo" if model.demo else "",
        "quantization_level": "",
    }


def _listed(model: vision_pb2.VisionModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": _EPOCH,
        "size": 0,
        "digest": hashlib.sha256(model.name.encode()).hexdigest(),
        "details": _details(model),
    }


def _piece(kind: str, model: str, content: str, created_at: str | None = None) -> dict[str, Any]:
    """What every chat (kind "chat") or generate object starts with."""
    if kind == "chat":
        text: dict[str, Any] = {"message": {"role": "assistant", "content": content}}
    else:
        text = {"response": content}
    return {"model": model, "created_at": created_at or _now(), **text}


def _tool_calls(final: vision_pb2.ChatFinal) -> tuple[list[dict[str, Any]], str]:
    """The reply's tool calls as Ollama's message has them (arguments an object),
    and the text of any whose arguments are not a JSON object (cut short), which
    Ollama gives as content."""
    calls: list[dict[str, Any]] = []
    text = ""
    for c in final.tool_calls:
        try:
            arguments = json.loads(c.arguments_json)
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            text += c.arguments_json
            continue
        function = {"index": len(calls), "name": c.name, "arguments": arguments}
        calls.append({"id": c.id, "function": function})
    return calls, text


def _with_calls(piece: dict[str, Any], final: vision_pb2.ChatFinal) -> dict[str, Any]:
    """A chat object's message with the reply's tool calls, if it made any."""
    calls, text = _tool_calls(final)
    message = piece.get("message")
    if message is not None and (calls or text):
        message = {**message, "content": message["content"] + text}
        piece = {**piece, "message": {**message, "tool_calls": calls} if calls else message}
    return piece


def _line(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode() + b"\n"


class OllamaApi:
    """The handlers: convert the body, call upstream through the core, convert back."""

    def __init__(self, upstream: Upstream) -> None:
        self._up = upstream

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /api/chat."""
        await self._up.authenticate(request)
        body = await read_json(request, self._up.body_limits.chat)
        chat = await off_loop_if_large(request, _chat_request, body)
        return await self._reply(request, body, chat, "chat")

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """POST /api/generate: one prompt (and images), with an optional system prompt."""
        await self._up.authenticate(request)
        body = await read_json(request, self._up.body_limits.chat)
        chat = await off_loop_if_large(request, _generate_request, body)
        if chat is None:  # Ollama's "load the model" call: ours are loaded
            return web.json_response(
                {
                    "model": _model_name(body),
                    "created_at": _now(),
                    "response": "",
                    "done": True,
                    "done_reason": "load",
                }
            )
        return await self._reply(request, body, chat, "generate")

    async def _reply(
        self, request: web.Request, body: dict[str, Any], chat: vision_pb2.ChatRequest, kind: str
    ) -> web.StreamResponse:
        """NDJSON lines, or one object with ``"stream": false``."""
        stream = get(body, "stream", bool, "stream")
        name = body.get("model") or chat.model  # echoed as the caller wrote it

        def piece(content: str, created_at: str | None = None) -> dict[str, Any]:
            return _piece(kind, name, content, created_at)

        async with self._up.chat(request, PROTOCOL, chat) as call:
            # Upstream errors before the first message get a real HTTP status.
            first = await self._up.first_reply(request, PROTOCOL, call, chat.model)
            if stream is False:
                messages = await call.rest(first)
                final = messages[-1].final
                reply = {**_with_calls(piece(reply_text(messages)), final), **_done(final)}
                return web.json_response(reply, headers={"X-Request-Id": call.request_id})
            return await self._lines(request, call, first, piece)

    async def _lines(
        self,
        request: web.Request,
        call: MeteredCall[vision_pb2.ChatResponse],
        message: vision_pb2.ChatResponse | None,
        piece: Callable[[str, str | None], dict[str, Any]],
    ) -> web.StreamResponse:
        """One JSON object a line, the last with done: true; the lines of the
        messages already here (a client that lags) in one write."""
        lines = frames.OllamaLines(piece)

        def encode(message: vision_pb2.ChatResponse) -> bytes:
            if not message.HasField("final"):
                return lines.delta(message.delta, _now())
            out = b""
            if message.final.tool_calls:  # as Ollama: a line of their own
                out += _line({**_with_calls(piece("", _now()), message.final), "done": False})
            return out + _line({**piece("", _now()), **_done(message.final)})

        response = ChatStream(
            headers={"Content-Type": "application/x-ndjson", "X-Request-Id": call.request_id}
        )
        await response.prepare(request)
        try:
            await relay_chat(call, message, encode, response)
        except (grpc.aio.AioRpcError, DreamsightError) as error:  # headers sent: an error line
            error_line = {"error": http_error(error, self._up.core.errors, request).message}
            await response.write(_line(error_line))
        await response.write_eof()
        return response

    async def tags(self, request: web.Request) -> web.Response:
        """GET /api/tags: the chat models."""
        models = await self._up.vision_models(request, PROTOCOL)
        return web.json_response({"models": [_listed(m) for m in models]})

    async def ps(self, request: web.Request) -> web.Response:
        """GET /api/ps: served models are always loaded."""
        models = await self._up.vision_models(request, PROTOCOL)
        loaded = [
            {**_listed(m), "expires_at": _NEVER, "size_vram": 0, "context_length": m.context_length}
            for m in models
        ]
        return web.json_response({"models": loaded})

    async def show(self, request: web.Request) -> web.Response:
        """POST /api/show: one model's details."""
        await self._up.authenticate(request)
        body = await read_json(request, self._up.body_limits.other)
        fields.OLLAMA_SHOW.check(body)
        model = await self._up.vision_model(request, PROTOCOL, _model_name(body))
        info = {
            "general.architecture": "llava",
            "llava.context_length": model.context_length,
            "dreamsight.max_images_per_request": model.max_images_per_request,
            "dreamsight.demo": model.demo,
            "dreamsight.source": model.source,
        }
        return web.json_response(
            {
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": _details(model),
                "model_info": info,
                # "tools": it may call them (Ollama's tools have no tool_choice).
                "capabilities": ["completion", "vision"]
                + (["tools"] if model.tool_call_parser else []),
                "modified_at": _EPOCH,
            }
        )

    async def version(self, request: web.Request) -> web.Response:
        """GET /api/version (no key needed, like Ollama's)."""
        return web.json_response({"version": VERSION})


def app(upstream: Upstream) -> web.Application:
    """The /api sub-application."""
    api = OllamaApi(upstream)
    sub = web.Application(middlewares=[error_middleware(_error_response, upstream.core.errors)])
    sub.add_routes(
        [
            web.post("/chat", api.chat),
            web.post("/generate", api.generate),
            web.get("/tags", api.tags),
            web.get("/ps", api.ps),
            web.post("/show", api.show),
            web.get("/version", api.version),
        ]
    )
    return sub
