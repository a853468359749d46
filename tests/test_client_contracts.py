"""The exact requests other people's clients send, replayed against the gateway.

Each file under tests/data/client_requests/ is one request as Open WebUI, vLLM's
``vllm bench serve`` or guidellm builds it, read from that client's own source
(the file says which version and where). Each is answered here as that client
reads answers: the fields it parses, the statuses it accepts. The gateway runs in
front of the real vision service (vLLM, tiny demo LLaVA) and diffusion service.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from diffusion_service.server import DiffusionService
from gateway.http_api import fields
from gateway.http_api.fields import Applied, Refused
from gateway.server import Gateway
from tests.conftest import VisionHandle
from tests.gateway_helpers import gateway_for, new_key

pytestmark = pytest.mark.slow
REQUESTS = Path(__file__).parent / "data" / "client_requests"
README = Path(__file__).parent.parent / "README.md"


def captured(name: str) -> dict[str, Any]:
    request: dict[str, Any] = json.loads((REQUESTS / f"{name}.json").read_text())
    return request


@pytest.fixture(scope="module")
async def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    vision: VisionHandle,
    diffusion_backend: DiffusionService,
) -> AsyncIterator[Gateway]:
    gw = await gateway_for(
        tmp_path_factory.mktemp("contracts"),
        vision.service.port,
        diffusion_port=diffusion_backend.port,
        http_port=0,
    )
    yield gw
    await gw.stop(0)


@pytest.fixture(scope="module")
async def key(gateway: Gateway) -> str:
    return await new_key(gateway, "contracts", "max")


class Reply:
    def __init__(self, status: int, content_type: str, text: str) -> None:
        self.status, self.content_type, self.text = status, content_type, text

    def json(self) -> Any:
        return json.loads(self.text)

    def events(self) -> list[Any]:
        """Server-sent events' data, [DONE] as the string."""
        data = [line[6:] for line in self.text.splitlines() if line.startswith("data: ")]
        return [d if d == "[DONE]" else json.loads(d) for d in data]

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]


async def replay(
    gateway: Gateway,
    name: str,
    key: str | None,
    model: str = "llava-demo",
    seed: int | None = None,
) -> tuple[Reply, dict[str, Any]]:
    """Send the captured request as the client does: its headers (its key replaced
    by ours when it sends one, or added when key_always), its body (with a seed,
    where given, so a sampled reply of the toy model is reproducible)."""
    request = captured(name)
    headers = {k: v.replace("KEY", key or "") for k, v in request["headers"].items()}
    if key is None:
        headers.pop("Authorization", None)
    elif "Authorization" not in headers:
        headers["Authorization"] = f"Bearer {key}"
    body = request.get("body")
    if isinstance(body, dict) and body.get("model") == "MODEL":
        body = {**body, "model": model}
    if isinstance(body, dict) and seed is not None:
        body = {**body, "seed": seed}
    url = f"http://127.0.0.1:{gateway.http_port}{request['path']}"
    async with (
        aiohttp.ClientSession() as session,
        session.request(request["method"], url, json=body, headers=headers) as response,
    ):
        text = await response.text()
        return Reply(response.status, response.content_type, text), body or {}


def check_chat_stream(reply: Reply, body: dict[str, Any]) -> None:
    """As vllm bench, guidellm and Open WebUI read a chat stream."""
    assert reply.status == 200, reply.text
    assert reply.content_type == "text/event-stream"
    events = reply.events()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )
    assert text, "some text arrived"
    assert all("delta" in c["choices"][0] for c in chunks if c.get("choices"))
    usage = [c["usage"] for c in chunks if c.get("choices") == [] and c.get("usage")]
    if (body.get("stream_options") or {}).get("include_usage"):
        assert len(usage) == 1, "usage comes in one chunk with no choices (vllm bench's rule)"
        if body.get("ignore_eos"):
            wanted = body.get("max_completion_tokens") or body.get("max_tokens")
            assert usage[0]["completion_tokens"] == wanted


async def test_open_webui_chat_with_its_built_in_tools_is_served(
    gateway: Gateway, key: str
) -> None:
    """The browser page sends its built-in tools with every chat: they go unused."""
    for name in (
        "openwebui_openai_chat_tools",
        "openwebui_openai_chat_params",
        "openwebui_openai_chat_vision",
    ):
        reply, body = await replay(gateway, name, key, seed=0)
        assert body["tools"], name
        check_chat_stream(reply, body)


async def test_open_webui_tool_follow_up_with_the_tools_results_is_served(
    gateway: Gateway, key: str
) -> None:
    """Its tool loop sends the assistant's tool calls and the tools' results back."""
    reply, body = await replay(gateway, "openwebui_openai_chat_tool_followup", key, seed=0)
    assert [m["role"] for m in body["messages"]][-2:] == ["assistant", "tool"]
    check_chat_stream(reply, body)


async def test_open_webui_ollama_chats_stream_with_a_key_and_say_why_without(
    gateway: Gateway, key: str
) -> None:
    for name in ("openwebui_ollama_chat", "openwebui_ollama_chat_vision"):
        reply, _ = await replay(gateway, name, key)
        assert reply.status == 200, reply.text
        lines = reply.lines()
        assert "".join(line["message"]["content"] for line in lines), name
        assert lines[-1]["done"] is True and lines[-1]["eval_count"] > 0
        refused, _ = await replay(gateway, name, None)  # as set from environment variables
        assert refused.status == 401
        assert refused.json() == {
            "error": "no API key: send the header 'Authorization: Bearer <your dreamsight key>'"
        }


async def test_open_webui_lists_only_chat_models_where_the_api_can_say(
    gateway: Gateway, key: str
) -> None:
    for with_key in (key, None):  # an Ollama connection set from the environment sends none
        tags, _ = await replay(gateway, "openwebui_models_ollama_tags", with_key)
        assert tags.status == 200
        assert [(m["name"], m["model"]) for m in tags.json()["models"]] == [
            ("llava-demo", "llava-demo")
        ]
    ps, _ = await replay(gateway, "openwebui_models_ollama_ps", key)
    assert [m["name"] for m in ps.json()["models"]] == ["llava-demo"]
    version, _ = await replay(gateway, "openwebui_ollama_version", None)
    assert all(p.isdigit() for p in version.json()["version"].split("."))
    show, _ = await replay(gateway, "openwebui_ollama_show", key)
    assert (
        "completion" in show.json()["capabilities"] and "tools" not in show.json()["capabilities"]
    )
    models, _ = await replay(gateway, "openwebui_models_openai", key)
    kinds = {m["id"]: m["kind"] for m in models.json()["data"]}
    assert kinds == {"llava-demo": "chat", "sd-demo": "image"}
    # Open WebUI keeps models whose info.meta says hidden out of its chat picker.
    hidden = {
        m["id"]: m.get("info", {}).get("meta", {}).get("hidden") for m in models.json()["data"]
    }
    assert hidden == {"llava-demo": None, "sd-demo": True}
    assert all(m["root"] == m["id"] for m in models.json()["data"])  # vllm bench reads root
    unauthenticated, _ = await replay(gateway, "openwebui_models_openai_verify", "ds_nope")
    assert unauthenticated.status == 401
    assert unauthenticated.json()["error"]["message"] == "unknown or revoked API key"


async def test_choosing_the_image_model_for_chat_says_which_models_chat(
    gateway: Gateway, key: str
) -> None:
    reply, _ = await replay(gateway, "openwebui_openai_chat_tools", key, model="sd-demo")
    assert reply.status == 404
    message = reply.json()["error"]["message"]
    assert "'sd-demo' draws images and cannot chat" in message and "'llava-demo'" in message
    ollama, _ = await replay(gateway, "openwebui_ollama_chat", key, model="sd-demo")
    assert ollama.status == 404 and "models that can chat: 'llava-demo'" in ollama.json()["error"]


async def test_vllm_bench_serve_chat_and_completions_backends(gateway: Gateway, key: str) -> None:
    models, _ = await replay(gateway, "vllm_bench_models", None)  # listed without its key
    assert models.status == 200
    assert [(m["id"], m["root"]) for m in models.json()["data"]] == [
        ("llava-demo", "llava-demo"),
        ("sd-demo", "sd-demo"),
    ]
    reply, body = await replay(gateway, "vllm_bench_openai_chat", key)
    check_chat_stream(reply, body)
    reply, body = await replay(gateway, "vllm_bench_openai_completions", key)
    assert reply.status == 200, reply.text
    events = reply.events()
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in events[:-1] if c.get("choices"))
    usage = [c["usage"] for c in events[:-1] if c.get("choices") == [] and c.get("usage")]
    assert text and usage[0]["completion_tokens"] == body["max_tokens"]  # ignore_eos honoured


async def test_guidellm_health_chat_and_text_completions(gateway: Gateway, key: str) -> None:
    health, _ = await replay(gateway, "guidellm_health", None)
    assert health.status == 200 and health.json()["status"] == "ok"
    models, _ = await replay(gateway, "guidellm_models", key)
    assert models.json()["data"][0]["id"] == "llava-demo"
    reply, body = await replay(gateway, "guidellm_chat", key)
    check_chat_stream(reply, body)
    running = [c["usage"]["completion_tokens"] for c in reply.events()[:-1] if c["choices"]]
    assert running == sorted(running) and running[-1] == body["max_completion_tokens"]
    reply, body = await replay(gateway, "guidellm_text_completions", key)
    assert reply.status == 200, reply.text
    final = [c["usage"] for c in reply.events()[:-1] if c.get("usage")][-1]
    assert final["completion_tokens"] == body["max_tokens"]


@pytest.mark.parametrize(
    ("endpoint", "name"),
    [(e, n) for e in fields.ENDPOINTS for n, s in e.specs.items() if isinstance(s, Refused)],
    ids=lambda v: v if isinstance(v, str) else v.title,
)
def test_every_refused_field_is_a_400_naming_it(endpoint: fields.Fields, name: str) -> None:
    spec = endpoint.specs[name]
    assert isinstance(spec, Refused)
    asked = {"n": 2}.get(name, "something")
    with pytest.raises(Exception) as caught:
        endpoint.check({name: asked})
    assert getattr(caught.value, "field", None) == name
    endpoint.check({name: None})  # null asks for nothing


def test_unknown_fields_are_refused_and_applied_ones_pass() -> None:
    for endpoint in fields.ENDPOINTS:
        with pytest.raises(Exception) as caught:
            endpoint.check({"no_such_field": 1})
        assert getattr(caught.value, "field", None) == "no_such_field"
        endpoint.check({n: None for n, s in endpoint.specs.items() if isinstance(s, Applied)})
    with pytest.raises(Exception) as caught:
        fields.OLLAMA_CHAT.check({"options": {"mirostat": 2}})
    assert getattr(caught.value, "field", None) == "options.mirostat"


def test_readme_compatibility_table_is_generated_from_the_code() -> None:
    assert fields.compatibility_table() in README.read_text(), (
        "regenerate README's table: python -m gateway.http_api.fields"
    )


def test_a_fine_tune_is_listed_with_its_kind_base_and_size() -> None:
    from dreamsight.diffusion.v1 import diffusion_pb2

    from gateway.http_api.openai import _image_model

    tune = diffusion_pb2.DiffusionModel(
        name="sks-star", base_model="sd-demo", kind=diffusion_pb2.TUNE_KIND_LORA, size_bytes=3_100
    )
    entry = _image_model(tune)
    assert (entry["kind"], entry["tune"], entry["parent"], entry["size_bytes"]) == (
        "image",
        "lora",
        "sd-demo",
        3_100,
    )
    base = _image_model(diffusion_pb2.DiffusionModel(name="sd-demo"))
    assert (base["tune"], base["parent"]) == (None, None)


def test_tool_calls_in_each_api_s_reply_shape() -> None:
    """What a reply with tool calls looks like to each API's clients (the demo
    model runs no parser, so Ollama's shape is checked on a built reply)."""
    from dreamsight.vision.v1 import vision_pb2

    from gateway.http_api import ollama, openai

    final = vision_pb2.ChatFinal(
        finish_reason=vision_pb2.FINISH_REASON_TOOL_CALLS,
        tool_calls=[
            vision_pb2.ToolCall(id="call_1", name="look", arguments_json='{"x": 1}'),
            vision_pb2.ToolCall(id="call_2", name="cut", arguments_json='{"x": '),
        ],
    )
    piece = ollama._piece("chat", "m", "")
    message = ollama._with_calls(piece, final)["message"]
    assert message["tool_calls"] == [
        {"id": "call_1", "function": {"index": 0, "name": "look", "arguments": {"x": 1}}}
    ]
    assert message["content"] == '{"x": ', "a call cut short is text, as Ollama gives it"
    assert ollama._done(final)["done_reason"] == "stop"
    whole = openai._chat_whole({"id": "x"}, [vision_pb2.ChatResponse(final=final)])
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert [c["function"]["arguments"] for c in choice["message"]["tool_calls"]] == [
        '{"x": 1}',
        '{"x": ',
    ]
    assert [c["index"] for c in openai._tool_calls_piece(final)["delta"]["tool_calls"]] == [0, 1]
