"""Byte templates for the streamed HTTP replies: OpenAI's server-sent chunks and
Ollama's NDJSON lines.

A stream's chunks differ only in a few values (the delta text, the usage so
far), so each stream encodes its chunk shapes once, with markers where those
values go, and each chunk then encodes only its own values. A filled template
is byte-identical to ``json.dumps`` of the whole object as the front ends build
it (default separators, ``ensure_ascii``): it is cut out of that very output
(tests/test_http_frames.py compares the two on many inputs).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any

string: Callable[[str], str] = encode_basestring_ascii
"""A str as json.dumps writes it (the same C function json.dumps calls)."""


class Template:
    """The JSON text of one object with holes where values go, framed (``data: ``
    and a blank line for an event, a newline for a line)."""

    def __init__(self, parts: list[str], order: list[int]) -> None:
        self._first = parts[0]
        self._rest = list(zip(order, parts[1:], strict=True))

    @classmethod
    def of(
        cls,
        build: Callable[..., Any],
        holes: int,
        *,
        before: str = "",
        after: str = "",
    ) -> Template:
        """The template of ``json.dumps(build(hole_0, ..., hole_n-1))``: build is
        called with one marker string per hole, and fill() puts the JSON text of
        each value where its marker's JSON (quotes included) was."""
        for nonce in range(1000):  # markers that nothing else in the object contains
            markers = [f"\ue000{nonce}:{i}\ue000" for i in range(holes)]
            text = json.dumps(build(*markers))
            quoted = [json.dumps(m) for m in markers]
            if all(text.count(q) == 1 for q in quoted):
                break
        else:  # pragma: no cover - the object would hold a thousand markers
            raise ValueError("no free marker for a template")
        order = sorted(range(holes), key=lambda i: text.index(quoted[i]))
        parts = []
        for i in order:  # the holes as the text has them
            head, _, text = text.partition(quoted[i])
            parts.append(head)
        parts.append(text)
        parts[0] = before + parts[0]
        parts[-1] += after
        return cls(parts, order)

    def bind(self, *values: str) -> Template:
        """This template with its last len(values) holes filled with their JSON
        text (the holes before them stay, numbered as they were)."""
        keep = len(self._rest) - len(values)
        parts, order = [self._first], []
        for i, part in self._rest:
            if i >= keep:
                parts[-1] += values[i - keep] + part
            else:
                order.append(i)
                parts.append(part)
        return Template(parts, order)

    def fill(self, *values: str) -> bytes:
        """The framed object with each hole's JSON text, hole 0 first."""
        out = self._first
        for i, part in self._rest:
            out += values[i] + part
        return out.encode()


def sse(build: Callable[..., Any], holes: int) -> Template:
    """A server-sent event's template."""
    return Template.of(build, holes, before="data: ", after="\n\n")


def line(build: Callable[..., Any], holes: int) -> Template:
    """An NDJSON line's template."""
    return Template.of(build, holes, after="\n")


def usage(prompt_tokens: int, completion_tokens: int) -> str:
    """OpenAI's usage object as json.dumps writes it."""
    return (
        f'{{"prompt_tokens": {prompt_tokens}, "completion_tokens": {completion_tokens},'
        f' "total_tokens": {prompt_tokens + completion_tokens}}}'
    )


class OpenAIChunks:
    """One stream's chunks: ``{**head, "choices": [choice]}``, then ``"usage":
    null`` (include_usage) or the figures so far (continuous_usage_stats).

    head is the chunk's id, created, model and object; piece(text, None) the
    choice that carries a delta's text (a function of the module, so that the
    templates of a stream's shape are made once and each stream only fills in
    its head)."""

    def __init__(
        self,
        head: dict[str, Any],
        piece: Callable[[str | None, str | None], dict[str, Any]],
        *,
        last_usage: bool,
        running: bool,
    ) -> None:
        self._running = running
        shapes = _openai_shapes(tuple(head), piece, last_usage, running)
        values = [json.dumps(value) for value in head.values()]
        self._choice, self._delta, self._usage = (shape.bind(*values) for shape in shapes)

    def choice(self, choice: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> bytes:
        """A chunk with any choice (the opening, tool calls, the finish)."""
        if self._running:
            return self._choice.fill(json.dumps(choice), usage(prompt_tokens, completion_tokens))
        return self._choice.fill(json.dumps(choice))

    def delta(self, text: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        """A chunk with a delta's text."""
        if self._running:
            return self._delta.fill(string(text), usage(prompt_tokens, completion_tokens))
        return self._delta.fill(string(text))

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The last chunk of include_usage: no choices, the whole usage."""
        return self._usage.fill(usage(prompt_tokens, completion_tokens))


@functools.lru_cache(maxsize=64)
def _openai_shapes(
    keys: tuple[str, ...],
    piece: Callable[[str | None, str | None], dict[str, Any]],
    last_usage: bool,
    running: bool,
) -> tuple[Template, Template, Template]:
    """The chunk templates of a stream's shape (a choice, a delta, the last
    usage), each with the head's values as its last holes."""
    holes = 2 if running else 1  # with running usage the usage object is a hole too

    def event(choices: list[Any], usage: Any, head: tuple[Any, ...]) -> dict[str, Any]:
        event = {**dict(zip(keys, head, strict=True)), "choices": choices}
        return {**event, "usage": usage} if last_usage else event

    def split(values: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        return (values[1] if running else None), values[holes:]

    def choice(*values: Any) -> dict[str, Any]:
        return event([values[0]], *split(values))

    def delta(*values: Any) -> dict[str, Any]:
        return event([piece(values[0], None)], *split(values))

    def last(*values: Any) -> dict[str, Any]:
        return {**dict(zip(keys, values[1:], strict=True)), "choices": [], "usage": values[0]}

    return (
        sse(choice, holes + len(keys)),
        sse(delta, holes + len(keys)),
        sse(last, 1 + len(keys)),
    )


class OllamaLines:
    """One stream's delta lines: ``{**piece(content, created_at), "done": false}``."""

    def __init__(self, piece: Callable[[str, str], dict[str, Any]]) -> None:
        self._delta = line(lambda c, t: {**piece(c, t), "done": False}, 2)

    def delta(self, content: str, created_at: str) -> bytes:
        """A line with a delta's text, stamped created_at."""
        return self._delta.fill(string(content), string(created_at))
