"""Reading request bodies, for both APIs: bounded, off the event loop when
large, and every malformed body a 400 that names the field.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web
from dreamsight.vision.v1 import vision_pb2

from dreamsight_server.errors import (
    InvalidArgument,
)

T = TypeVar("T")


MAX_JSON_DEPTH = 32
"""Deepest nesting a request body may have (a chat request needs 5)."""


OFF_LOOP_BYTES = 64 * 1024
"""Bodies larger than this are decoded in a worker thread, off the event loop."""


async def read_json(request: web.Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object; any malformed body is InvalidArgument.

    A body over limit bytes is HTTP 413, refused from its Content-Length before
    a byte is read, or as soon as a chunked body passes it; large bodies are
    decoded off the event loop, so one tenant's body does not hold every other
    tenant's calls."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = bytearray()
    async for piece in request.content.iter_chunked(OFF_LOOP_BYTES):
        raw += piece
        if len(raw) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
    charset = request.charset or "utf-8"
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(decode_json, raw, charset)
    return decode_json(raw, charset)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_json(raw: bytes | bytearray, charset: str = "utf-8") -> dict[str, Any]:
    """Bytes as a JSON object of bounded depth, with finite numbers only."""
    try:
        text = raw.decode(charset)
    except LookupError:
        raise InvalidArgument("body", f"unsupported charset {charset[:40]!r}") from None
    except UnicodeDecodeError as error:
        raise InvalidArgument("body", f"not valid {charset[:40]}: {error.reason}") from None
    try:
        body = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidArgument("body", f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:  # JSONDecodeError, huge integers, non-finite numbers
        raise InvalidArgument("body", f"not valid JSON: {str(error)[:200]}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    _check_structure(body)
    return body


def _check_structure(body: Any) -> None:
    """Bounded depth, and no lone surrogates (``"\\ud800"`` is valid JSON but no
    string protobuf or a model can take)."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidArgument("body", f"nested deeper than {MAX_JSON_DEPTH} levels")
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        for item in items:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidArgument("body", "a string holds invalid unicode") from None
            elif isinstance(item, dict | list):
                stack.append((item, depth + 1))


_KINDS = {str: "a string", bool: "a boolean", float: "a number", int: "an integer"}


def get(body: Mapping[str, Any], key: str, kind: type[T], param: str) -> T | None:
    """body[key] checked to be of kind (ints count as floats); None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if kind is float and type(value) is int:
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidArgument(param, f"must be {_KINDS.get(kind, kind.__name__)}")
    return value


def get_int(body: Mapping[str, Any], key: str, param: str, low: int, high: int) -> int | None:
    """An integer within [low, high], or None when absent."""
    value = get(body, key, int, param)
    if value is not None and not low <= value <= high:
        raise InvalidArgument(param, f"{value} is outside {low} to {high}")
    return value


def stop_strings(value: Any, param: str) -> list[str]:
    """A stop string or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidArgument(param, "must be a string or a list of strings")


def decode_base64(text: Any, param: str) -> bytes:
    """Bytes from base64 text (standard alphabet, padding optional)."""
    if not isinstance(text, str):
        raise InvalidArgument(param, "must be a base64 string")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(param, "is not valid base64") from None


def json_schema_format(schema: Any, param: str) -> vision_pb2.ResponseFormat:
    """A JSON-schema response format from a schema object."""
    if not isinstance(schema, dict):
        raise InvalidArgument(param, "must be a JSON schema object")
    return vision_pb2.ResponseFormat(
        type=vision_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=json.dumps(schema)
    )


def tools(value: Any, param: str) -> list[vision_pb2.Tool]:
    """Function tools, as OpenAI and Ollama declare them."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(param, "must be a list of tools")
    out = []
    for i, tool in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidArgument(f"{where}.type", "only function tools are supported")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidArgument(f"{where}.function.name", "each tool names its function")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise InvalidArgument(f"{where}.function.parameters", "must be a JSON Schema object")
        out.append(
            vision_pb2.Tool(
                name=function["name"],
                description=get(function, "description", str, f"{where}.function.description")
                or "",
                parameters_json=json.dumps(parameters) if parameters else "",
            )
        )
    return out


def tool_call(value: Any, where: str, arguments_as_text: bool) -> vision_pb2.ToolCall:
    """A past tool call in a conversation: OpenAI's arguments are JSON text,
    Ollama's an object."""
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidArgument(f"{where}.function.name", "each tool call names its function")
    arguments = function.get("arguments")
    if arguments_as_text:
        text = get(function, "arguments", str, f"{where}.function.arguments") or "{}"
    elif arguments is None or isinstance(arguments, dict):
        text = json.dumps(arguments or {})
    else:
        raise InvalidArgument(f"{where}.function.arguments", "must be an object")
    call_id = get(value, "id", str, f"{where}.id") or ""
    return vision_pb2.ToolCall(id=call_id, name=function["name"], arguments_json=text)


MAX_SEED = 2**63 - 1


MAX_UINT32 = 2**32 - 1


MAX_INT32 = 2**31 - 1


async def off_loop_if_large(request: web.Request, convert: Callable[..., T], *args: Any) -> T:
    """convert(*args): in a worker thread when the body was large (base64 images
    decode and protobufs build for a while), else here."""
    if (request.content_length or 0) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(convert, *args)
    return convert(*args)
