"""The streamed chunks' byte templates (gateway.http_api.frames) against the
straightforward encoding, a dict and json.dumps per chunk, as the front ends
wrote them before: the bytes must be the same for every shape and input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from dreamsight.vision.v1 import vision_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.http_api import frames, ollama, openai

TRICKY = ["", " ", "a", 'say "hi"', "line\nbreak\r\t", "back\\slash", "é ü 漢字 🙂", "\x00\x1f",
          "\u2028\u2029", "\ud7ff\ue000", "</script>", '{"k": [1, 2]}', "\ue0000:0\ue000",
          "\ue0000:1\ue000"]  # fmt: skip
"""Unicode, quotes, escapes, JSON lookalikes and the templates' own markers."""
texts = st.one_of(st.sampled_from(TRICKY), st.text(max_size=40))
tokens = st.integers(min_value=0, max_value=2**32 - 1)
SHAPES = {"chat": openai._CHAT, "completion": openai._COMPLETION}


def sse(data: dict[str, Any] | str) -> bytes:
    """The straightforward server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


def openai_chunk(
    head: dict[str, Any],
    choice: dict[str, Any],
    last: bool,
    running: bool,
    prompt_tokens: int,
    completion_tokens: int,
) -> bytes:
    """An OpenAI chunk as a dict, then json.dumps."""
    event = {**head, "choices": [choice]}
    if not last:
        return sse(event)
    if not running:
        return sse({**event, "usage": None})
    so_far = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return sse({**event, "usage": so_far})


def openai_stream(
    head: dict[str, Any],
    shape: Any,
    messages: list[vision_pb2.ChatResponse],
    last: bool,
    running: bool,
) -> list[bytes]:
    """A whole stream's events, the straightforward way (as _events wrote them)."""
    head = {**head, "object": shape.chunk_object}
    events, prompt = [], 0
    if shape.opening is not None:
        events.append(openai_chunk(head, shape.opening, last, running, 0, 0))
    for message in messages:
        if not message.HasField("final"):
            prompt = message.prompt_tokens or prompt
            piece = shape.piece(message.delta, None)
            events.append(
                openai_chunk(head, piece, last, running, prompt, message.completion_tokens)
            )
            continue
        final = message.final
        prompt = final.prompt_tokens
        if final.tool_calls:
            piece = openai._tool_calls_piece(final)
            events.append(openai_chunk(head, piece, last, running, prompt, final.completion_tokens))
        end = shape.piece(None, openai._finish(final))
        events.append(openai_chunk(head, end, last, running, prompt, final.completion_tokens))
        if last:
            events.append(sse({**head, "choices": [], "usage": openai._usage(final)}))
    return events


def template_stream(
    head: dict[str, Any],
    shape: Any,
    messages: list[vision_pb2.ChatResponse],
    last: bool,
    running: bool,
) -> list[bytes]:
    """The same stream through the templates, as _events calls them."""
    chunks = frames.OpenAIChunks(
        {**head, "object": shape.chunk_object}, shape.piece, last_usage=last, running=running
    )
    events, prompt = [], 0
    if shape.opening is not None:
        events.append(chunks.choice(shape.opening, 0, 0))
    for message in messages:
        if not message.HasField("final"):
            prompt = message.prompt_tokens or prompt
            events.append(chunks.delta(message.delta, prompt, message.completion_tokens))
            continue
        final = message.final
        prompt = final.prompt_tokens
        if final.tool_calls:
            piece = openai._tool_calls_piece(final)
            events.append(chunks.choice(piece, prompt, final.completion_tokens))
        end = shape.piece(None, openai._finish(final))
        events.append(chunks.choice(end, prompt, final.completion_tokens))
        if last:
            events.append(chunks.usage(prompt, final.completion_tokens))
    return events


def ollama_line(piece: dict[str, Any]) -> bytes:
    """An Ollama delta line, the straightforward way."""
    return json.dumps({**piece, "done": False}).encode() + b"\n"


tool_calls = st.lists(
    st.builds(vision_pb2.ToolCall, id=texts, name=texts, arguments_json=texts), max_size=3
)
deltas = st.builds(
    vision_pb2.ChatResponse, delta=texts, prompt_tokens=tokens, completion_tokens=tokens
)
finals = st.builds(
    vision_pb2.ChatFinal,
    finish_reason=st.sampled_from(list(vision_pb2.FinishReason.values())),
    prompt_tokens=tokens,
    completion_tokens=tokens,
    tool_calls=tool_calls,
)
heads = st.fixed_dictionaries(
    {"id": texts.map(lambda t: f"chatcmpl-{t}"), "created": tokens, "model": texts}
)


@settings(max_examples=300, deadline=None)
@given(
    head=heads,
    shape=st.sampled_from(sorted(SHAPES)),
    messages=st.lists(deltas, max_size=6),
    final=finals,
    last=st.booleans(),
    running=st.booleans(),
)
def test_openai_chunks_are_the_bytes_json_dumps_writes(
    head: dict[str, Any],
    shape: str,
    messages: list[vision_pb2.ChatResponse],
    final: vision_pb2.ChatFinal,
    last: bool,
    running: bool,
) -> None:
    stream = [*messages, vision_pb2.ChatResponse(final=final)]
    running = last and running  # as _text builds _Usage
    expected = openai_stream(head, SHAPES[shape], stream, last, running)
    assert template_stream(head, SHAPES[shape], stream, last, running) == expected


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize(("last", "running"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("text", TRICKY)
def test_tricky_texts_in_every_place(shape: str, last: bool, running: bool, text: str) -> None:
    head = {"id": f"cmpl-{text}", "created": 1700000000, "model": text}
    call = vision_pb2.ToolCall(id=text, name=text, arguments_json=text)
    stream = [
        vision_pb2.ChatResponse(delta=text, prompt_tokens=7, completion_tokens=1),
        vision_pb2.ChatResponse(delta=text),  # later deltas without a prompt count
        vision_pb2.ChatResponse(final=vision_pb2.ChatFinal(completion_tokens=2, tool_calls=[call])),
    ]
    expected = openai_stream(head, SHAPES[shape], stream, last, running)
    assert template_stream(head, SHAPES[shape], stream, last, running) == expected


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["chat", "generate"]),
    model=texts,
    content=texts,
    created_at=st.one_of(st.just("2025-01-02T03:04:05.678901Z"), texts.filter(bool)),
)
def test_ollama_lines_are_the_bytes_json_dumps_writes(
    kind: str, model: str, content: str, created_at: str
) -> None:
    def piece(text: str, stamp: str | None = None) -> dict[str, Any]:
        return ollama._piece(kind, model, text, stamp)

    lines = frames.OllamaLines(piece)
    assert lines.delta(content, created_at) == ollama_line(piece(content, created_at))


def test_a_template_finds_its_holes_in_any_order_and_free_markers() -> None:
    # The model name holds the first markers a template would try.
    template = frames.sse(lambda a, b: {"b": b, "m": "\ue0000:0\ue000\ue0000:1\ue000", "a": a}, 2)
    expected = 'data: {"b": "2", "m": "\\ue0000:0\\ue000\\ue0000:1\\ue000", "a": 1}\n\n'
    assert template.fill("1", '"2"') == expected.encode()
