"""Ollama- and OpenAI-compatible HTTP on the gateway, driven by their own clients.

The slow tests run ollama-python and the OpenAI SDK against a real gateway in
front of the real vision service (vLLM, tiny demo LLaVA) and a real diffusion
service (tiny demo Stable Diffusion). The fast ones put the fake vision
backend behind the gateway for what only the transport decides: error shapes,
errors after the stream began, request ids, deadlines.

Sync clients run in a thread: the gateway serves on this test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import ollama
import openai
import pytest
from aiohttp import web
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc
from PIL import Image

from diffusion_service.server import DiffusionService
from gateway.http_api import openai as openai_api
from gateway.server import Gateway
from tests.conftest import VisionHandle
from tests.gateway_helpers import (
    FakeBackend,
    FakeVision,
    bearer,
    gateway_for,
    new_key,
    no_slots_held,
)
from tests.test_http_frames import ollama_line, openai_stream
from tests.test_vision_service import png, user

slow = pytest.mark.slow
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "round": {"type": "boolean"}},
    "required": ["colour", "round"],
    "additionalProperties": False,
}


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def ollama_client(gateway: Gateway, key: str, **headers: str) -> ollama.Client:
    return ollama.Client(
        host=f"http://127.0.0.1:{gateway.http_port}",
        headers={"Authorization": f"Bearer {key}", **headers},
    )


def ollama_async(gateway: Gateway, key: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(
        host=f"http://127.0.0.1:{gateway.http_port}", headers={"Authorization": f"Bearer {key}"}
    )


def openai_client(gateway: Gateway, key: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{gateway.http_port}/v1",
        api_key=key,
        max_retries=0,
        default_headers=headers or None,
    )


def openai_async(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gateway.http_port}/v1", api_key=key, max_retries=0
    )


def requests(gateway: Gateway, **labels: str) -> float:
    value = gateway.core.metrics.registry.get_sample_value(
        "dreamsight_gateway_requests_total", labels
    )
    return value or 0.0


# --- the real services -------------------------------------------------------


@pytest.fixture(scope="module")
async def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    vision: VisionHandle,
    diffusion_backend: DiffusionService,
) -> AsyncIterator[Gateway]:
    """A gateway with HTTP on a free port; no queue, so a full tier answers 429 at once."""
    gw = await gateway_for(
        tmp_path_factory.mktemp("http"),
        vision.service.port,
        diffusion_port=diffusion_backend.port,
        http_port=0,
        queue_length=0,
    )
    yield gw
    await gw.stop(0)


@slow
async def test_ollama_streams_chat_with_an_image_and_bills_like_grpc(
    gateway: Gateway, vision: VisionHandle
) -> None:
    key = await new_key(gateway, "ollama-user", "pro")
    messages = [{"role": "user", "content": "What is this?", "images": [png("red")]}]
    options = {"temperature": 0, "num_predict": 8}

    def stream() -> list[ollama.ChatResponse]:
        with ollama_client(gateway, key) as client:
            return list(client.chat("llava-demo", messages, stream=True, options=options))

    parts = await asyncio.to_thread(stream)
    direct = vision_pb2_grpc.VisionServiceStub(vision.channel)
    request = vision_pb2.ChatRequest(
        model="llava-demo",
        messages=[user("What is this?", png("red"))],
        options=vision_pb2.ChatOptions(temperature=0.0, max_tokens=8),
    )
    final = [r async for r in direct.Chat(request)][-1].final
    assert len(parts) >= 3 and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts) == final.text
    last = parts[-1]
    assert last.done and last.done_reason in ("stop", "length")
    assert last.eval_count == final.completion_tokens
    assert last.prompt_eval_count == final.prompt_tokens > 64
    assert last.total_duration and last.total_duration >= (last.prompt_eval_duration or 0) > 0
    # The ledger bills HTTP calls as it bills gRPC ones, and the metrics say which front end.
    entries = gateway.store.sync.usage_entries("ollama-user", 0)
    assert len(entries) == 1 and entries[0].gpu_seconds > 0
    assert requests(
        gateway,
        service="VisionService",
        method="Chat",
        code="OK",
        tier="pro",
        protocol="ollama",
    ) == pytest.approx(1)


@slow
async def test_ollama_async_json_schema_generate_and_model_lists(gateway: Gateway) -> None:
    key = await new_key(gateway, "ollama-async", "pro")
    client = ollama_async(gateway, key)
    reply = await client.chat(
        "llava-demo",
        [{"role": "user", "content": "Answer in JSON.", "images": [png("red")]}],
        format=SCHEMA,
        options={"temperature": 0, "num_predict": 64},
    )
    assert reply.done and reply.done_reason == "stop", reply.message.content
    value = json.loads(reply.message.content or "")
    assert set(value) == {"colour", "round"}
    generated = await client.generate(
        "llava-demo:latest", "Describe.", images=[png("green")], options={"num_predict": 4}
    )
    assert generated.done and generated.eval_count and generated.response is not None
    listed = await client.list()
    assert [m.model for m in listed.models] == ["llava-demo"]
    shown = await client.show("llava-demo")
    assert shown.capabilities == ["completion", "vision"]
    assert shown.modelinfo and shown.modelinfo["llava.context_length"] == 1024
    running = await client.ps()
    assert [m.model for m in running.models] == ["llava-demo"]
    with pytest.raises(ollama.ResponseError) as missing:
        await client.chat("no-such-model", [{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404


@slow
async def test_openai_chat_streams_with_usage_and_matches_the_unstreamed_reply(
    gateway: Gateway,
) -> None:
    key = await new_key(gateway, "openai-user", "pro")
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": data_url(png("red"))}},
            ],
        }
    ]

    def stream() -> list[Any]:
        with openai_client(gateway, key) as client:
            return list(
                client.chat.completions.create(
                    model="llava-demo",
                    messages=messages,
                    max_tokens=8,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )

    chunks = await asyncio.to_thread(stream)
    async with openai_async(gateway, key) as client:
        whole = await client.chat.completions.create(
            model="llava-demo", messages=messages, max_tokens=8, temperature=0
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] in ("stop", "length") and not any(finished[:-1])
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens >= 1
    assert whole.usage.prompt_tokens > 64
    billed = {e.request_id for e in gateway.store.sync.usage_entries("openai-user", 0)}
    assert whole.id.removeprefix("chatcmpl-") in billed and len(billed) == 2


@slow
async def test_openai_json_schema_models_and_images(gateway: Gateway) -> None:
    key = await new_key(gateway, "painter", "pro")
    async with openai_async(gateway, key) as client:
        reply = await client.chat.completions.create(
            model="llava-demo",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Answer in JSON."},
                        {"type": "image_url", "image_url": {"url": data_url(png("red"))}},
                    ],
                }
            ],
            max_tokens=64,
            temperature=0,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True},
            },
        )
        models = await client.models.list()
        images = await client.images.generate(
            model="sd-demo", prompt="a red dog", size="64x64", n=2, response_format="b64_json"
        )
    assert set(json.loads(reply.choices[0].message.content or "")) == {"colour", "round"}
    assert [m.id for m in models.data] == ["llava-demo", "sd-demo"]
    assert images.data is not None and len(images.data) == 2
    for image in images.data:
        with Image.open(io.BytesIO(base64.b64decode(image.b64_json or ""))) as decoded:
            assert decoded.format == "PNG" and decoded.size == (64, 64)
    assert requests(
        gateway,
        service="DiffusionService",
        method="Generate",
        code="OK",
        tier="pro",
        protocol="openai",
    ) == pytest.approx(1)
    assert gateway.store.sync.usage_since("painter", 0) > 0


TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "report_colour",
            "description": "say the colour",
            "parameters": SCHEMA,
        },
    },
    {"type": "function", "function": {"name": "give_up", "parameters": {"type": "object"}}},
]


@slow
async def test_openai_tools_named_required_streamed_and_answered(gateway: Gateway) -> None:
    key = await new_key(gateway, "toolsmith", "pro")
    asked: list[Any] = [{"role": "user", "content": [
        {"type": "text", "text": "What colour is it?"},
        {"type": "image_url", "image_url": {"url": data_url(png("red"))}},
    ]}]  # fmt: skip
    async with openai_async(gateway, key) as client:
        named = await client.chat.completions.create(
            model="llava-demo",
            messages=asked,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "report_colour"}},
            max_tokens=64,
            temperature=0,
        )
        chunks = [
            c
            async for c in await client.chat.completions.create(
                model="llava-demo",
                messages=asked,
                tools=TOOLS,
                tool_choice="required",
                parallel_tool_calls=False,
                max_tokens=96,
                temperature=0,
                stream=True,
            )
        ]
        (call,) = named.choices[0].message.tool_calls or []
        follow_up: list[Any] = [
            *asked,
            named.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "it is red"},
        ]
        answered = await client.chat.completions.create(
            model="llava-demo",
            messages=follow_up,
            tools=TOOLS,
            max_tokens=4,
            temperature=0,
        )
    choice = named.choices[0]
    assert (choice.finish_reason, choice.message.content) == ("stop", None)
    assert call.type == "function" and call.function.name == "report_colour"
    assert set(json.loads(call.function.arguments)) == {"colour", "round"}
    # Streamed: the role, the calls whole in the chunk before the last, the end.
    streamed = [d.tool_calls for c in chunks for d in [c.choices[0].delta] if d.tool_calls]
    assert len(streamed) == 1 and len(streamed[0]) == 1
    (delta,) = streamed[0]
    assert delta.index == 0 and delta.id and delta.function and delta.function.name
    assert delta.function.name in ("report_colour", "give_up")
    assert isinstance(json.loads(delta.function.arguments or ""), dict)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The tool's result answered: text again, no calls (no parser: auto leaves tools unused).
    assert answered.choices[0].message.tool_calls is None
    assert answered.choices[0].message.content


@slow
async def test_tool_requests_refused_name_the_field_and_hold_no_slot(gateway: Gateway) -> None:
    key = await new_key(gateway, "toolbreaker", "free")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tool_choice": {"type": "function", "function": {"name": "paint"}}, "tools": TOOLS},
         "tool_choice.function_name"),
        ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "x", "parameters": [1]}}]},
         "tools[0].function.parameters"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "x", "arguments": "{nope"}}]}]},
         "messages[1].tool_calls[0].arguments_json"),
        ({"messages": [{"role": "function", "name": "x", "content": "1"}]}, "messages[0].role"),
    ]  # fmt: skip
    async with aiohttp.ClientSession() as session:
        for extra, param in cases:
            body = {"model": "llava-demo", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(
                f"http://127.0.0.1:{gateway.http_port}/v1/chat/completions",
                json={**body, **extra},
                headers={"Authorization": f"Bearer {key}"},
            ) as reply:
                error = (await reply.json())["error"]
                assert (reply.status, error["param"]) == (400, param), error
    await no_slots_held(gateway, "toolbreaker")


@slow
async def test_ollama_tools_and_tool_results_are_served(gateway: Gateway) -> None:
    key = await new_key(gateway, "ollama-tools", "pro")
    client = ollama_async(gateway, key)
    reply = await client.chat(
        "llava-demo",
        [
            {"role": "user", "content": "What colour is it?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "report_colour", "arguments": {"colour": "red"}}}
                ],
            },
            {"role": "tool", "content": "red", "tool_name": "report_colour"},
        ],
        tools=TOOLS,
        options={"num_predict": 4, "temperature": 0},
    )
    assert reply.message.content and not reply.message.tool_calls
    show = await client.show("llava-demo")
    assert "tools" not in (show.capabilities or []), "the demo service runs no parser"


@slow
async def test_bad_key_is_401_in_each_api(gateway: Gateway) -> None:
    bad = "ds_0123456789ab_" + "x" * 32
    with pytest.raises(ollama.ResponseError) as ollama_error:
        await ollama_async(gateway, bad).chat("llava-demo", [{"role": "user", "content": "hi"}])
    assert ollama_error.value.status_code == 401
    assert ollama_error.value.error == "unknown or revoked API key"
    async with openai_async(gateway, bad) as client:
        with pytest.raises(openai.AuthenticationError) as openai_error:
            await client.models.list()
    assert openai_error.value.status_code == 401


@slow
async def test_full_tier_is_429_and_a_disconnect_frees_the_slot_and_aborts_the_engine(
    gateway: Gateway, vision: VisionHandle
) -> None:
    key = await new_key(gateway, "free-user", "free")
    client = ollama_async(gateway, key)
    stream = await client.chat(
        "llava-demo",
        [{"role": "user", "content": "Tell a long story.", "images": [png("blue")]}],
        stream=True,
        options={"temperature": 1.0, "seed": 5, "num_predict": 900},
    )
    first = await anext(stream)
    assert not first.done
    assert vision.service.engine.num_unfinished() == 1
    assert await gateway.core.limiter.in_flight("free-user") == 1
    async with openai_async(gateway, key) as other:
        with pytest.raises(openai.RateLimitError) as limited:
            await other.chat.completions.create(
                model="llava-demo", messages=[{"role": "user", "content": "hi"}]
            )
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert limited.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    with pytest.raises(ollama.ResponseError) as refused:
        await client.chat("llava-demo", [{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 429

    assert isinstance(stream, AsyncGenerator)
    await stream.aclose()  # the client hangs up mid-stream
    for _ in range(100):
        if vision.service.engine.num_unfinished() == 0:
            break
        await asyncio.sleep(0.05)
    assert vision.service.engine.num_unfinished() == 0
    await no_slots_held(gateway, "free-user")
    assert requests(
        gateway,
        service="VisionService",
        method="Chat",
        code="CANCELLED",
        tier="free",
        protocol="ollama",
    ) == pytest.approx(1)
    again = await client.chat("llava-demo", [{"role": "user", "content": "hi"}])
    assert again.done


# --- the fake backend: what only the transport decides -----------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeBackend]:
    backend = FakeBackend(FakeVision())
    await backend.start()
    yield backend
    await backend.kill()


@pytest.fixture
async def fake_gateway(tmp_path: Path, fake: FakeBackend) -> AsyncIterator[Gateway]:
    gw = await gateway_for(tmp_path, fake.port, http_port=0)
    yield gw
    await gw.stop(0)


async def test_backend_errors_before_and_after_the_first_chunk(
    fake_gateway: Gateway, fake: FakeBackend
) -> None:
    key = await new_key(fake_gateway, "flaky", "pro")
    client = ollama_async(fake_gateway, key)
    with pytest.raises(ollama.ResponseError) as refused:
        await client.chat("fake", [{"role": "user", "content": "invalid"}])
    assert refused.value.status_code == 400
    assert refused.value.error == "messages[0].content: the fake refuses this"
    async with openai_async(fake_gateway, key) as other:
        with pytest.raises(openai.BadRequestError) as bad:
            await other.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "invalid"}]
            )
        assert bad.value.body["param"] == "messages[0].content"  # type: ignore[index]
        stream = await other.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "sleep:2"}], stream=True
        )
        with pytest.raises(openai.APIError) as broken:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    await fake.kill()  # the backend dies mid-stream
        assert "unavailable" in str(broken.value.body)
    await no_slots_held(fake_gateway, "flaky")


async def test_a_repeated_request_id_bills_every_call_and_the_deadline_goes_upstream(
    fake_gateway: Gateway, fake: FakeBackend
) -> None:
    key = await new_key(fake_gateway, "careful", "pro")
    headers = {"X-Request-Id": "req-7", "X-Request-Timeout": "30"}

    def twice() -> list[str]:
        replies = []
        with openai_client(fake_gateway, key, **headers) as client:
            for _ in range(2):
                reply = client.chat.completions.create(
                    model="fake", messages=[{"role": "user", "content": "hi"}]
                )
                replies.append(reply.choices[0].message.content or "")
        return replies

    assert await asyncio.to_thread(twice) == ["t0 t1 t2 "] * 2
    entries = fake_gateway.store.sync.usage_entries("careful", 0)
    assert [e.request_id for e in entries] == ["req-7", "req-7"], "each call billed, id traced"
    assert sum(e.gpu_seconds for e in entries) == pytest.approx(1.0)
    remaining = fake.impl.deadlines[-1]  # the caller's, plus time to settle a stopped call
    settle = fake_gateway.settings.settle_timeout_s
    assert remaining is not None and 20 + settle < remaining <= 31 + settle


async def test_bad_requests_name_the_field(fake_gateway: Gateway) -> None:
    key = await new_key(fake_gateway, "sloppy", "pro")
    async with openai_async(fake_gateway, key) as client:
        with pytest.raises(openai.BadRequestError) as remote:
            await client.chat.completions.create(
                model="fake",
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
                    }
                ],
            )
        assert remote.value.body["param"] == "messages[0].content[0].image_url.url"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as size:
            await client.images.generate(prompt="a dog", size="big")
        assert size.value.body["param"] == "size"  # type: ignore[index]
    with pytest.raises(ollama.ResponseError) as option:
        await ollama_async(fake_gateway, key).chat(
            "fake", [{"role": "user", "content": "hi"}], options={"temperature": "hot"}
        )
    assert option.value.status_code == 400
    assert option.value.error == "options.temperature: must be a number"
    assert await fake_gateway.core.limiter.in_flight("sloppy") == 0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_version_needs_no_key_and_unknown_paths_are_404(fake_gateway: Gateway) -> None:
    base = f"http://127.0.0.1:{fake_gateway.http_port}"
    status, body = await asyncio.to_thread(_get, f"{base}/api/version")
    assert status == 200 and json.loads(body)["version"]
    status, body = await asyncio.to_thread(_get, f"{base}/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, body = await asyncio.to_thread(_get, f"{base}/api/tags")  # the base models
    assert status == 200 and [m["name"] for m in json.loads(body)["models"]] == ["fake"]
    assert await asyncio.to_thread(_post, f"{base}/api/show", b'{"model": "fake"}') == 401
    status, body = await asyncio.to_thread(_get, f"{base}/api/pull")
    assert status == 404 and json.loads(body) == {"error": "Not Found"}
    status, body = await asyncio.to_thread(_get, f"{base}/api/chat")
    assert status == 405 and json.loads(body) == {"error": "Method Not Allowed"}


def _post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


async def test_the_key_is_checked_before_the_body_is_read(fake_gateway: Gateway) -> None:
    base = f"http://127.0.0.1:{fake_gateway.http_port}"
    for path in ("/api/chat", "/api/generate", "/v1/chat/completions", "/v1/images/generations"):
        assert await asyncio.to_thread(_post, base + path, b"not json") == 401, path


def _post_chunked(url: str, body: bytes, key: str) -> tuple[int, str]:
    """A POST without Content-Length (chunked), as a streaming client sends it."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=iter([body]), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_each_endpoint_has_its_own_body_limit(fake_gateway: Gateway) -> None:
    """Chat bodies carry images and may be large; the others may not (413, naming
    the limit), with or without a Content-Length, and nothing is held after."""
    key = await new_key(fake_gateway, "bulky", "pro")
    base = f"http://127.0.0.1:{fake_gateway.http_port}"
    limit = fake_gateway.settings.http_body_bytes
    prompt = json.dumps({"prompt": "x" * (limit + 10)}).encode()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        for path in ("/v1/images/generations", "/api/show"):
            async with session.post(base + path, data=prompt) as response:
                assert response.status == 413, path
                text = await response.text()
                assert str(limit) in text and "too large" in text, text
        async with session.post(base + "/v1/images/generations", data=prompt) as response:
            assert (await response.json())["error"]["param"] == "body"
        chat = {"model": "fake", "messages": [{"role": "user", "content": "y" * (limit + 10)}]}
        async with session.post(base + "/v1/chat/completions", json=chat) as response:
            assert response.status == 200, "a chat body may be larger"
    status, text = await asyncio.to_thread(
        _post_chunked, base + "/v1/images/generations", prompt, key
    )
    assert status == 413 and str(limit) in text
    await no_slots_held(fake_gateway, "bulky")  # the slot follows the bill
    rows = fake_gateway.store.sync.usage_entries("bulky", 0)
    assert len(rows) == 1, "only the chat was billed"


async def test_grpc_still_counts_as_grpc(fake_gateway: Gateway) -> None:
    key = await new_key(fake_gateway, "mixed", "pro")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fake_gateway.port}") as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        request = vision_pb2.ChatRequest(messages=[user("hi")])
        assert [r async for r in stub.Chat(request, metadata=bearer(key))][-1].HasField("final")
    assert requests(
        fake_gateway,
        service="VisionService",
        method="Chat",
        code="OK",
        tier="pro",
        protocol="grpc",
    ) == pytest.approx(1)


async def test_no_slot_leaks_after_http_disconnects_and_deadlines(
    fake_gateway: Gateway, fake: FakeBackend
) -> None:
    key = await new_key(fake_gateway, "leaky-http", "max")
    client = ollama_async(fake_gateway, key)
    timed = ollama.AsyncClient(
        host=f"http://127.0.0.1:{fake_gateway.http_port}",
        headers={"Authorization": f"Bearer {key}", "X-Request-Timeout": "0.05"},
    )

    async def hang_up() -> None:
        stream = await client.chat("fake", [{"role": "user", "content": "sleep:2"}], stream=True)
        assert not (await anext(stream)).done
        assert isinstance(stream, AsyncGenerator)
        await stream.aclose()

    async def time_out() -> int:
        with pytest.raises(ollama.ResponseError) as caught:
            await timed.chat("fake", [{"role": "user", "content": "sleep:2"}])
        return caught.value.status_code

    for _ in range(3):
        results = await asyncio.gather(*(hang_up() for _ in range(8)), time_out(), time_out())
        assert results[-2:] == [504, 504]
    await no_slots_held(fake_gateway, "leaky-http")
    for _ in range(100):
        if fake.impl.running["leaky-http"] == 0:
            break
        await asyncio.sleep(0.05)
    assert fake.impl.running["leaky-http"] == 0, "the backend computes for nobody"
    assert fake_gateway.core.metrics.in_flight.labels("max")._value.get() == 0


async def test_a_lagging_client_gets_the_waiting_chunks_in_one_write_byte_for_byte(
    fake_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = await new_key(fake_gateway, "laggard", "pro")
    writes: list[bytes] = []
    write = web.StreamResponse.write

    async def lagging(self: web.StreamResponse, data: bytes) -> None:
        writes.append(bytes(data))
        await asyncio.sleep(0.02)  # a slow client: the backend's deltas queue up meanwhile
        await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", lagging)
    url = f"http://127.0.0.1:{fake_gateway.http_port}"
    message = {"role": "user", "content": "chunks:40"}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        body = {"model": "fake", "messages": [message], "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        async with session.post(f"{url}/v1/chat/completions", json=body) as reply:
            sse = await reply.read()
        sse_writes, writes[:] = len(writes), []
        body = {"model": "fake", "messages": [message]}
        async with session.post(f"{url}/api/chat", json=body) as reply:
            ndjson = await reply.read()
    events = sse.split(b"\n\n")[:-1]
    assert len(events) == 1 + 40 + 2 + 1  # opening, deltas, finish, usage, [DONE]
    assert sse_writes <= len(events) // 2, "the waiting chunks went in one write each time"
    first = json.loads(events[0].removeprefix(b"data: "))
    head = {"id": first["id"], "created": first["created"], "model": "fake"}
    stream = [vision_pb2.ChatResponse(delta=f"t{i} ") for i in range(40)]
    final = vision_pb2.ChatFinal(finish_reason=vision_pb2.FINISH_REASON_STOP, completion_tokens=40)
    stream.append(vision_pb2.ChatResponse(final=final))
    expected = openai_stream(head, openai_api._CHAT, stream, last=True, running=False)
    assert sse == b"".join(expected) + b"data: [DONE]\n\n", "the same bytes as one write each"
    lines = ndjson.splitlines(keepends=True)
    assert len(lines) == 41 and len(writes) <= len(lines) // 2
    for i, line in enumerate(lines[:-1]):
        stamp = json.loads(line)["created_at"]
        piece = {"model": "fake", "created_at": stamp,
                 "message": {"role": "assistant", "content": f"t{i} "}}  # fmt: skip
        assert line == ollama_line(piece)
    assert json.loads(lines[-1])["done"] is True
    await no_slots_held(fake_gateway, "laggard")
    assert fake_gateway.store.sync.usage_entries("laggard", 0)[-1].gpu_seconds == 0.5


async def test_a_stream_of_n_deltas_takes_at_most_n_plus_1_socket_writes(
    fake_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers, the opening chunk and the first delta go in one write; the last
    chunk, [DONE] (or Ollama's done line) and the body's end in another."""
    from aiohttp import http_writer, web_protocol

    key = await new_key(fake_gateway, "writes", "pro")
    writes = 0
    write, writelines = http_writer.StreamWriter._write, http_writer.StreamWriter._writelines

    def counted(original: Any) -> Any:
        def spy(self: http_writer.StreamWriter, data: Any) -> None:
            nonlocal writes
            if isinstance(self._protocol, web_protocol.RequestHandler):  # the gateway's side
                writes += 1
            original(self, data)

        return spy

    monkeypatch.setattr(http_writer.StreamWriter, "_write", counted(write))
    monkeypatch.setattr(http_writer.StreamWriter, "_writelines", counted(writelines))
    url = f"http://127.0.0.1:{fake_gateway.http_port}"
    message = {"role": "user", "content": "steps:6:20"}  # a delta every 20 ms: none coalesce
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        body = {"model": "fake", "messages": [message], "stream": True}
        async with session.post(f"{url}/v1/chat/completions", json=body) as reply:
            events = (await reply.read()).split(b"\n\n")[:-1]
        sse_writes, writes = writes, 0
        async with session.post(f"{url}/api/chat", json={**body, "stream": True}) as reply:
            lines = (await reply.read()).splitlines()
    assert len(events) == 1 + 6 + 1 + 1  # opening, deltas, finish, [DONE]
    assert sse_writes <= 6 + 1
    assert len(lines) == 6 + 1 and writes <= 6 + 1
    await no_slots_held(fake_gateway, "writes")
