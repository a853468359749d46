"""Tool calling on the vision service: real gRPC, real vLLM, the demo LLaVA
(named and required tool choices, constrained by structured decoding), and
vLLM's own tool call parsers reading replies for tool choice auto."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from dreamsight.vision.v1 import vision_pb2

from dreamsight_server.settings import SettingsError
from tests.conftest import VisionHandle
from tests.test_vision_service import greedy, named, png, stub, user
from vision_service.domain import FinishReason, Tool, ToolChoice, ToolUse
from vision_service.tool_calls import ToolCalling

pytestmark = pytest.mark.slow

COLOUR = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["colour", "count"],
    "additionalProperties": False,
}
TOOLS = [
    vision_pb2.Tool(name="report_colour", description="say the colour",
                    parameters_json=json.dumps(COLOUR)),
    vision_pb2.Tool(name="give_up", description="when unsure",
                    parameters_json='{"type": "object", "properties": {}}'),
]  # fmt: skip


async def tool_chat(
    vision: VisionHandle, request: vision_pb2.ChatRequest
) -> tuple[list[str], vision_pb2.ChatFinal]:
    request.model = "llava-demo"
    deltas, final = [], None
    async for response in stub(vision).Chat(request):
        if response.WhichOneof("event") == "delta":
            deltas.append(response.delta)
        else:
            final = response.final
    assert final is not None
    return deltas, final


async def test_a_named_tool_is_called_with_arguments_its_schema_allows(
    vision: VisionHandle,
) -> None:
    _, final = await tool_chat(
        vision,
        vision_pb2.ChatRequest(
            messages=[user("What colour is it?", png("red"))],
            tools=TOOLS,
            tool_choice=named("report_colour"),
            options=greedy(64),
        ),
    )
    assert final.finish_reason == vision_pb2.FINISH_REASON_STOP, final
    (call,) = final.tool_calls
    assert call.name == "report_colour" and call.id.startswith("call_")
    arguments = json.loads(call.arguments_json)
    assert set(arguments) == {"colour", "count"}
    assert arguments["colour"] in ("red", "green", "blue") and 0 <= arguments["count"] <= 9
    assert final.text == "", "the call is not also the reply's text"


async def test_required_calls_come_from_the_tools_and_parallel_false_keeps_one(
    vision: VisionHandle,
) -> None:
    required = vision_pb2.ToolChoice(mode=vision_pb2.TOOL_CHOICE_MODE_REQUIRED)
    deltas, final = await tool_chat(
        vision,
        vision_pb2.ChatRequest(
            messages=[user("What colour is it?", png("blue"))],
            tools=TOOLS,
            tool_choice=required,
            parallel_tool_calls=False,
            options=greedy(96),
        ),
    )
    assert final.finish_reason == vision_pb2.FINISH_REASON_TOOL_CALLS, final
    assert deltas == [] and final.text == ""
    (call,) = final.tool_calls
    assert call.name in ("report_colour", "give_up")
    assert isinstance(json.loads(call.arguments_json), dict)


async def test_auto_without_a_parser_leaves_tools_unused_and_streams_text(
    vision: VisionHandle,
) -> None:
    listed = await stub(vision).ListModels(vision_pb2.ListModelsRequest())
    assert listed.models[0].tool_call_parser == ""
    plain = vision_pb2.ChatRequest(messages=[user("Describe it.", png("red"))], options=greedy(8))
    with_tools = vision_pb2.ChatRequest()
    with_tools.CopyFrom(plain)
    with_tools.tools.extend(TOOLS)
    deltas, final = await tool_chat(vision, with_tools)
    _, alone = await tool_chat(vision, plain)
    assert deltas and "".join(deltas) == final.text == alone.text
    assert final.prompt_tokens == alone.prompt_tokens, "the tools are not shown to the model"
    assert not final.tool_calls


async def test_a_tool_result_in_the_conversation_reaches_the_prompt(vision: VisionHandle) -> None:
    asked = user("What colour is it?", png("green"))
    called = vision_pb2.Message(
        role=vision_pb2.ROLE_ASSISTANT,
        tool_calls=[
            vision_pb2.ToolCall(id="call_1", name="report_colour", arguments_json='{"count": 1}')
        ],
    )
    messages = [
        asked,
        called,
        vision_pb2.Message(role=vision_pb2.ROLE_TOOL, content="", tool_call_id="call_1"),
    ]
    _, empty = await tool_chat(
        vision, vision_pb2.ChatRequest(messages=messages, tools=TOOLS, options=greedy(4))
    )
    messages[2] = vision_pb2.Message(
        role=vision_pb2.ROLE_TOOL,
        content="the colour is green and there is one shape",
        tool_call_id="call_1",
        tool_name="report_colour",
    )
    _, answered = await tool_chat(
        vision, vision_pb2.ChatRequest(messages=messages, tools=TOOLS, options=greedy(4))
    )
    assert answered.prompt_tokens > empty.prompt_tokens


async def test_a_tool_choice_of_none_hides_the_tools(vision: VisionHandle) -> None:
    none = vision_pb2.ToolChoice(mode=vision_pb2.TOOL_CHOICE_MODE_NONE)
    request = vision_pb2.ChatRequest(
        messages=[user("Describe it.", png("red"))], tools=TOOLS, tool_choice=none,
        options=greedy(6),
    )  # fmt: skip
    deltas, final = await tool_chat(vision, request)
    assert deltas and not final.tool_calls
    assert final.finish_reason != vision_pb2.FINISH_REASON_TOOL_CALLS


async def test_a_named_tool_cut_short_still_says_what_it_called(vision: VisionHandle) -> None:
    _, final = await tool_chat(
        vision,
        vision_pb2.ChatRequest(
            messages=[user("What colour is it?")],
            tools=TOOLS,
            tool_choice=named("report_colour"),
            options=greedy(2),
        ),
    )
    assert final.finish_reason == vision_pb2.FINISH_REASON_LENGTH
    (call,) = final.tool_calls
    assert call.name == "report_colour"
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.arguments_json)


# vLLM's parsers on the demo tokenizer, for tool choice auto.

USE = ToolUse(
    (Tool("report_colour", "say the colour", COLOUR), Tool("give_up", "", {"type": "object"})),
    ToolChoice.AUTO,
)


@pytest.fixture(scope="module")
def python_tag_tokenizer(llava_dir: Path) -> Any:
    """The demo tokenizer with Llama 3.1's <|python_tag|>, which llama3_json needs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|python_tag|>"]})
    return tokenizer


def test_a_parser_that_does_not_fit_the_model_stops_the_service_at_start(
    llava_dir: Path,
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    with pytest.raises(SettingsError, match="--tool-call-parser: llama3_json does not fit"):
        ToolCalling("llama3_json", tokenizer, "m")
    with pytest.raises(SettingsError, match="'llama' is not one of vLLM's tool call parsers"):
        ToolCalling("llama", tokenizer, "m")


def test_auto_streams_text_and_holds_back_a_reply_that_begins_with_a_call(
    python_tag_tokenizer: Any,
) -> None:
    plan = ToolCalling("llama3_json", python_tag_tokenizer, "m").plan(USE)
    assert plan is not None and plan.json_schema is None, "auto is not constrained"

    text = plan.reply()
    assert [text.feed(p) for p in (" ", "It is", " red {a}.")] == ["", " It is", " red {a}."]
    assert text.finish(FinishReason.STOP) == ("", (), FinishReason.STOP)

    call = plan.reply()
    pieces = [' {"name": "report_colour", ', '"parameters": {"colour": "red", "count": 2}}']
    assert [call.feed(p) for p in pieces] == ["", ""]
    content, calls, reason = call.finish(FinishReason.STOP)
    assert (content, reason) == ("", FinishReason.TOOL_CALLS)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("report_colour", {"colour": "red", "count": 2})
    ]

    # Began like a call but is not one: all of it is the reply's text, at the end.
    braces = plan.reply()
    assert braces.feed("{red} is the colour") == ""
    assert braces.finish(FinishReason.STOP) == ("{red} is the colour", (), FinishReason.STOP)


def test_parallel_false_keeps_the_first_of_several_calls(python_tag_tokenizer: Any) -> None:
    plan = ToolCalling("llama3_json", python_tag_tokenizer, "m").plan(
        dataclasses.replace(USE, parallel=False)
    )
    assert plan is not None
    reply = plan.reply()
    reply.feed('{"name": "give_up", "parameters": {}}; {"name": "report_colour", "parameters": {}}')
    _, calls, _ = reply.finish(FinishReason.STOP)
    assert [c.name for c in calls] == ["give_up"]


async def test_a_tool_request_that_is_refused_leaves_nothing_running(vision: VisionHandle) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tool_chat(
            vision,
            vision_pb2.ChatRequest(
                messages=[user("hi")], tools=TOOLS, tool_choice=named("paint"), options=greedy(4)
            ),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'paint' is not one of the request's tools" in (caught.value.details() or "")
    assert vision.service.engine.num_unfinished() == 0


async def test_tools_count_toward_the_prompt_limit_only_where_the_model_sees_them(
    vision: VisionHandle,
) -> None:
    """Open WebUI sends ~20,000 characters of built-in tools with every chat:
    left unused (auto, no parser) they cost nothing; required, they fill the prompt."""
    limit = vision.service.settings.prompt_char_limit
    big = vision_pb2.Tool(name="search", description="x " * (limit // 2 + 1))
    unused = vision_pb2.ChatRequest(messages=[user("hi")], tools=[big], options=greedy(2))
    _, final = await tool_chat(vision, unused)
    assert final.completion_tokens >= 1
    required = vision_pb2.ChatRequest()
    required.CopyFrom(unused)
    required.tool_choice.mode = vision_pb2.TOOL_CHOICE_MODE_REQUIRED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tool_chat(vision, required)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"more than the {limit}" in (caught.value.details() or "")
