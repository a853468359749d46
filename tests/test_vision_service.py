"""The vision service end to end: real gRPC, real vLLM, the tiny demo LLaVA."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from dreamsight.common.v1 import common_pb2
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from tests.conftest import VisionHandle
from tests.metrics_scrape import metrics_samples

pytestmark = pytest.mark.slow


def png(color: str | tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def user(text: str, *images: bytes) -> vision_pb2.Message:
    return vision_pb2.Message(
        role=vision_pb2.ROLE_USER,
        content=text,
        images=[common_pb2.Image(data=i, mime_type="image/png") for i in images],
    )


TOOL = vision_pb2.Tool(name="look", description="looks", parameters_json='{"type": "object"}')


def named(function: str) -> vision_pb2.ToolChoice:
    return vision_pb2.ToolChoice(mode=vision_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name=function)


def greedy(max_tokens: int = 12, **extra: Any) -> vision_pb2.ChatOptions:
    return vision_pb2.ChatOptions(temperature=0.0, max_tokens=max_tokens, **extra)


def stub(vision: VisionHandle) -> vision_pb2_grpc.VisionServiceAsyncStub:
    return vision_pb2_grpc.VisionServiceStub(vision.channel)


async def chat(
    vision: VisionHandle, *messages: vision_pb2.Message, options: vision_pb2.ChatOptions
) -> tuple[list[str], vision_pb2.ChatFinal]:
    deltas: list[str] = []
    final = None
    request = vision_pb2.ChatRequest(model="llava-demo", messages=messages, options=options)
    async for response in stub(vision).Chat(request):
        if response.WhichOneof("event") == "delta":
            assert final is None, "nothing may follow the final message"
            deltas.append(response.delta)
        else:
            final = response.final
    assert final is not None
    return deltas, final


async def test_health_went_from_not_serving_to_serving(vision: VisionHandle) -> None:
    assert vision.health_before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert vision.health_after == health_pb2.HealthCheckResponse.SERVING
    service_health = await health_pb2_grpc.HealthStub(vision.channel).Check(
        health_pb2.HealthCheckRequest(service="dreamsight.vision.v1.VisionService")
    )
    assert service_health.status == health_pb2.HealthCheckResponse.SERVING


async def test_streamed_chat_with_an_image(vision: VisionHandle) -> None:
    deltas, final = await chat(
        vision, user("What is in this image?", png("red")), options=greedy(12)
    )
    assert len(deltas) >= 2, "text arrives as several deltas"
    assert "".join(deltas) == final.text
    assert final.finish_reason in (vision_pb2.FINISH_REASON_LENGTH, vision_pb2.FINISH_REASON_STOP)
    assert 1 <= final.completion_tokens <= 12
    # 64 image tokens plus the templated text.
    assert final.prompt_tokens > 64
    assert final.usage.gpu_seconds > 0
    ttft = final.time_to_first_token.ToTimedelta().total_seconds()
    total = final.usage.total_time.ToTimedelta().total_seconds()
    assert 0 < ttft <= total
    assert final.model == "llava-demo"


async def test_different_images_give_different_greedy_answers(vision: VisionHandle) -> None:
    _, red = await chat(vision, user("Describe it.", png("red")), options=greedy(10))
    _, red_again = await chat(vision, user("Describe it.", png("red")), options=greedy(10))
    _, blue = await chat(vision, user("Describe it.", png("blue")), options=greedy(10))
    assert red.text == red_again.text
    assert red.text != blue.text


async def test_prompt_tokens_count_images_as_vllm_does(vision: VisionHandle) -> None:
    _, none = await chat(vision, user("Describe it."), options=greedy(2))
    _, one = await chat(vision, user("Describe it.", png("red")), options=greedy(2))
    # One image: 64 feature tokens plus the "\n" the template puts after it.
    assert one.prompt_tokens - none.prompt_tokens == 64 + 1


async def test_multi_turn_with_two_images(vision: VisionHandle) -> None:
    messages = [
        vision_pb2.Message(role=vision_pb2.ROLE_SYSTEM, content="You describe images."),
        user("What colour is this?", png("red")),
        vision_pb2.Message(role=vision_pb2.ROLE_ASSISTANT, content="It is red."),
        user("And this one?", png("green")),
    ]
    _, final = await chat(vision, *messages, options=greedy(8))
    _, other = await chat(
        vision, *messages[:3], user("And this one?", png("blue")), options=greedy(8)
    )
    assert final.prompt_tokens > 2 * 64
    assert final.completion_tokens >= 1
    assert final.text != other.text, "the second image is seen"


async def test_json_schema_output_parses(vision: VisionHandle) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "round": {"type": "boolean"}},
        "required": ["colour", "round"],
        "additionalProperties": False,
    }
    fmt = vision_pb2.ResponseFormat(
        type=vision_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=json.dumps(schema)
    )
    _, final = await chat(
        vision,
        user("Answer in JSON.", png("red")),
        options=greedy(64, response_format=fmt),
    )
    assert final.finish_reason == vision_pb2.FINISH_REASON_STOP, final.text
    value = json.loads(final.text)
    assert set(value) == {"colour", "round"}
    assert value["colour"] in ("red", "green", "blue") and isinstance(value["round"], bool)


async def test_eight_concurrent_streams_complete(vision: VisionHandle) -> None:
    colors = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
    results = await asyncio.gather(
        *(chat(vision, user("Describe.", png(c)), options=greedy(12)) for c in colors)
    )
    assert len(results) == 8
    for deltas, final in results:
        assert final.completion_tokens >= 1 and "".join(deltas) == final.text
    # Each stream's share is at most its own wall time (dt/n while n run).
    for _, final in results:
        assert final.usage.gpu_seconds <= final.usage.total_time.ToTimedelta().total_seconds()


async def test_a_text_chat_skips_vllms_renderer_thread_and_an_image_chat_does_not(
    vision: VisionHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token ids alone go to vLLM as its rendered input, added on the event loop
    (a raw prompt hops to vLLM's renderer thread and back, which waits behind
    the busy loop: docs/benchmarks.md, twelfth round); images still go raw, so
    that their processing runs off the loop."""
    processor = vision.service.engine._engine.input_processor
    raw = processor.process_inputs_async
    hopped: list[Any] = []

    async def counted(*args: Any, **kwargs: Any) -> Any:
        hopped.append(args[1])
        return await raw(*args, **kwargs)

    monkeypatch.setattr(processor, "process_inputs_async", counted)
    deltas, final = await chat(vision, user("Say hello."), options=greedy(4))
    assert final.completion_tokens >= 1 and "".join(deltas) == final.text
    assert hopped == []
    _, final = await chat(vision, user("Describe.", png("red")), options=greedy(4))
    assert final.completion_tokens >= 1
    assert len(hopped) == 1 and "multi_modal_data" in hopped[0]


async def _wait_idle(vision: VisionHandle) -> int:
    for _ in range(100):
        if vision.service.engine.num_unfinished() == 0:
            return 0
        await asyncio.sleep(0.05)
    return int(vision.service.engine.num_unfinished())


async def test_cancel_mid_stream_aborts_the_engine_request(vision: VisionHandle) -> None:
    request = vision_pb2.ChatRequest(
        model="llava-demo",
        messages=[user("Tell a long story.", png("red"))],
        options=vision_pb2.ChatOptions(temperature=1.0, seed=1, max_tokens=900),
    )
    call = stub(vision).Chat(request)
    got = 0
    async for response in call:
        if response.WhichOneof("event") == "delta":
            got += 1
            if got == 2:
                break
    assert vision.service.engine.num_unfinished() == 1, "still generating when cancelled"
    call.cancel()
    assert await _wait_idle(vision) == 0
    _, final = await chat(vision, user("Hello", png("blue")), options=greedy(4))
    assert final.completion_tokens >= 1


async def test_deadline_aborts_the_engine_request(vision: VisionHandle) -> None:
    request = vision_pb2.ChatRequest(
        model="llava-demo",
        messages=[user("Tell a long story.", png("green"))],
        options=vision_pb2.ChatOptions(temperature=1.0, seed=2, max_tokens=900),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub(vision).Chat(request, timeout=0.3):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await _wait_idle(vision) == 0


BAD_REQUESTS: list[tuple[str, vision_pb2.ChatRequest, str]] = [
    ("no messages", vision_pb2.ChatRequest(model="llava-demo"), "messages"),
    (
        "empty content",
        vision_pb2.ChatRequest(messages=[vision_pb2.Message(role=vision_pb2.ROLE_USER)]),
        "messages[0].content",
    ),
    (
        "no role",
        vision_pb2.ChatRequest(messages=[vision_pb2.Message(content="hi")]),
        "messages[0].role",
    ),
    (
        "undecodable image",
        vision_pb2.ChatRequest(messages=[user("hi", b"not an image at all")]),
        "messages[0].images[0]",
    ),
    (
        "truncated png",
        vision_pb2.ChatRequest(messages=[user("hi", png("red")[:40])]),
        "messages[0].images[0]",
    ),
    (
        "image over the byte limit",
        vision_pb2.ChatRequest(messages=[user("hi", b"\x89PNG" + b"\0" * 200_001)]),
        "messages[0].images[0]",
    ),
    (
        "image over the pixel limit",
        vision_pb2.ChatRequest(messages=[user("hi", png("red", (2000, 1000)))]),
        "messages[0].images[0]",
    ),
    (
        "too many images",
        vision_pb2.ChatRequest(messages=[user("hi", *[png("red")] * 4)]),
        "messages",
    ),
    (
        "prompt longer than the context",
        vision_pb2.ChatRequest(messages=[user("word " * 3000)]),
        "messages",
    ),
    (
        "max_tokens past the context",
        vision_pb2.ChatRequest(
            messages=[user("hi")], options=vision_pb2.ChatOptions(max_tokens=5000)
        ),
        "options.max_tokens",
    ),
    (
        "temperature out of range",
        vision_pb2.ChatRequest(
            messages=[user("hi")], options=vision_pb2.ChatOptions(temperature=3.0)
        ),
        "options.temperature",
    ),
    (
        "top_p NaN",
        vision_pb2.ChatRequest(
            messages=[user("hi")], options=vision_pb2.ChatOptions(top_p=float("nan"))
        ),
        "options.top_p",
    ),
    (
        "a prompt and messages",
        vision_pb2.ChatRequest(prompt="Once upon", messages=[user("hi")]),
        "prompt",
    ),
    (
        "a raw prompt longer than the context",
        vision_pb2.ChatRequest(prompt="word " * 3000),
        "prompt",
    ),
    (
        "min_tokens past max_tokens",
        vision_pb2.ChatRequest(
            messages=[user("hi")], options=vision_pb2.ChatOptions(max_tokens=4, min_tokens=5)
        ),
        "options.min_tokens",
    ),
    (
        "min_tokens past the default max_tokens",
        vision_pb2.ChatRequest(
            messages=[user("hi")], options=vision_pb2.ChatOptions(min_tokens=900)
        ),
        "options.min_tokens",
    ),
    (
        "negative top_k",
        vision_pb2.ChatRequest(messages=[user("hi")], options=vision_pb2.ChatOptions(top_k=-3)),
        "options.top_k",
    ),
    (
        "bad json schema",
        vision_pb2.ChatRequest(
            messages=[user("hi")],
            options=vision_pb2.ChatOptions(
                response_format=vision_pb2.ResponseFormat(
                    type=vision_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema="{nope"
                )
            ),
        ),
        "options.response_format.json_schema",
    ),
    *[
        (name, vision_pb2.ChatRequest(messages=[user("hi")], **fields), field)
        for name, fields, field in (
            (
                "unknown named tool",
                {"tools": [TOOL], "tool_choice": named("paint")},
                "tool_choice.function_name",
            ),
            (
                "required tool choice without tools",
                {"tool_choice": vision_pb2.ToolChoice(mode=vision_pb2.TOOL_CHOICE_MODE_REQUIRED)},
                "tool_choice",
            ),
            ("two tools of one name", {"tools": [TOOL, TOOL]}, "tools[1].name"),
            (
                "tool name with a space",
                {"tools": [vision_pb2.Tool(name="look here")]},
                "tools[0].name",
            ),
            (
                "tool parameters not JSON",
                {"tools": [vision_pb2.Tool(name="look", parameters_json="{x")]},
                "tools[0].parameters_json",
            ),
            (
                "tool parameters not an object",
                {"tools": [vision_pb2.Tool(name="look", parameters_json="[]")]},
                "tools[0].parameters_json",
            ),
            (
                "json format with a named tool",
                {
                    "tools": [TOOL],
                    "tool_choice": named("look"),
                    "options": vision_pb2.ChatOptions(
                        response_format=vision_pb2.ResponseFormat(
                            type=vision_pb2.RESPONSE_FORMAT_TYPE_JSON
                        )
                    ),
                },
                "options.response_format",
            ),
            (
                "too many tools",
                {"tools": [vision_pb2.Tool(name=f"t{i}") for i in range(129)]},
                "tools",
            ),
        )
    ],
    (
        "tool calls on a user message",
        vision_pb2.ChatRequest(
            messages=[
                vision_pb2.Message(
                    role=vision_pb2.ROLE_USER,
                    content="hi",
                    tool_calls=[vision_pb2.ToolCall(id="c", name="look")],
                )
            ]
        ),
        "messages[0].tool_calls",
    ),
    (
        "past tool call arguments not JSON",
        vision_pb2.ChatRequest(
            messages=[
                user("hi"),
                vision_pb2.Message(
                    role=vision_pb2.ROLE_ASSISTANT,
                    tool_calls=[vision_pb2.ToolCall(id="c", name="look", arguments_json="{x")],
                ),
            ]
        ),
        "messages[1].tool_calls[0].arguments_json",
    ),
    (
        "a tool call id on a user message",
        vision_pb2.ChatRequest(
            messages=[vision_pb2.Message(role=vision_pb2.ROLE_USER, content="hi", tool_call_id="c")]
        ),
        "messages[0].tool_call_id",
    ),
]


@pytest.mark.parametrize(
    ("name", "request_", "field"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    vision: VisionHandle, name: str, request_: vision_pb2.ChatRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub(vision).Chat(request_):
            pass
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert (error.details() or "").startswith(f"{field}:"), error.details()
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == field
    assert vision.service.engine.num_unfinished() == 0


async def test_a_huge_prompt_is_refused_before_it_is_tokenized(vision: VisionHandle) -> None:
    """4 MB of text cannot fit 1,024 tokens: refused by its length in characters,
    without spending the tokenizer's seconds and memory on it."""
    settings = vision.service.settings
    huge = "x" * (settings.prompt_char_limit + 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub(vision).Chat(vision_pb2.ChatRequest(messages=[user(huge)])):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert details.startswith("messages:") and f"{len(huge)} characters" in details, details
    # A long prompt under the limit is still measured in tokens (off the event loop).
    long = vision_pb2.ChatRequest(messages=[user("word " * 3000)])
    with pytest.raises(grpc.aio.AioRpcError) as tokens:
        async for _ in stub(vision).Chat(long):
            pass
    assert "tokens, longer than the model's context" in (tokens.value.details() or "")


async def test_unknown_model_is_not_found(vision: VisionHandle) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub(vision).Chat(
            vision_pb2.ChatRequest(model="nope", messages=[user("hi")])
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(vision).GetModel(vision_pb2.GetModelRequest(name="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_and_get_models_report_the_demo_model(vision: VisionHandle) -> None:
    listed = await stub(vision).ListModels(vision_pb2.ListModelsRequest())
    (model,) = listed.models
    assert model.name == "llava-demo" and model.demo
    assert model.origin == common_pb2.MODEL_ORIGIN_DEMO
    assert model.context_length == 1024 and model.max_images_per_request == 3
    got = await stub(vision).GetModel(vision_pb2.GetModelRequest(name="llava-demo"))
    assert got.model == model


async def test_metrics_are_exposed_and_move(vision: VisionHandle) -> None:
    port = vision.service.server.metrics_port
    assert port
    before = await asyncio.to_thread(metrics_samples, port)
    _, final = await chat(vision, user("Count.", png("red")), options=greedy(5))
    after = await asyncio.to_thread(metrics_samples, port)
    ok = 'dreamsight_vision_requests_total{method="Chat",outcome="ok"}'
    assert after[ok] == before.get(ok, 0) + 1
    completion = "dreamsight_vision_completion_tokens_total"
    assert after[completion] - before[completion] == final.completion_tokens
    assert (
        after["dreamsight_vision_gpu_seconds_total"] > before["dreamsight_vision_gpu_seconds_total"]
    )
    ttft = "dreamsight_vision_time_to_first_token_seconds_count"
    assert after[ttft] == before[ttft] + 1
    assert "dreamsight_vision_engine_queue_depth" in after
    assert after["dreamsight_vision_requests_in_flight"] == 0


def test_the_stat_logger_feeds_the_gauges_and_stands_in_for_vllms() -> None:
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from vision_service.metrics import VisionMetrics

    registry = CollectorRegistry()
    factory = VisionMetrics(registry).stat_logger_factory()
    # vLLM adds its own Prometheus logger unless one of the factories is one.
    assert isinstance(factory, type) and issubclass(factory, PrometheusStatLogger)
    from vllm.v1.metrics.stats import IterationStats

    logger = factory(None, [0])
    step = IterationStats()
    step.num_generation_tokens = 7
    step.prompt_token_stats.computed = 32
    logger.record(SimpleNamespace(num_waiting_reqs=3, num_running_reqs=2), step)
    logger.record(None, None)  # an output without scheduler stats changes nothing
    logger.log()
    logger.log_engine_initialized()
    logger.record_sleep_state(0, 0)
    assert registry.get_sample_value("dreamsight_vision_engine_queue_depth") == 3
    assert registry.get_sample_value("dreamsight_vision_engine_running_requests") == 2
    # Tokens per engine step, as vLLM's vllm:iteration_tokens_total counts them.
    assert registry.get_sample_value("dreamsight_vision_engine_step_tokens_count") == 1
    assert registry.get_sample_value("dreamsight_vision_engine_step_tokens_sum") == 39


async def test_a_raw_prompt_is_continued_without_the_chat_template(
    vision: VisionHandle, llava_dir: Path
) -> None:
    """The legacy completions API's text: tokenized as it stands (with BOS), no template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    text = "Once upon a time"
    request = vision_pb2.ChatRequest(model="llava-demo", prompt=text, options=greedy(6))
    deltas, final = [], None
    async for response in stub(vision).Chat(request):
        if response.HasField("final"):
            final = response.final
        else:
            deltas.append(response.delta)
    assert final is not None and final.completion_tokens == 6
    assert final.prompt_tokens == len(tokenizer(text)["input_ids"])
    _, templated = await chat(vision, user(text), options=greedy(6))
    assert templated.prompt_tokens > final.prompt_tokens  # the template adds its headers
    assert "".join(deltas) == final.text
