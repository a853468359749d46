"""Tool calling: a request's tools shown to the model, then its reply
constrained to a call or parsed into calls, as vLLM's own server does it.

- A named tool (``ToolChoice.FUNCTION``) or ``REQUIRED`` constrains the reply
  with structured decoding to the JSON vLLM's server uses for them
  (``get_json_schema_from_tools``): it works on every model.
- ``AUTO`` needs vLLM's tool call parser for the model's family
  (``--tool-call-parser``, e.g. ``llama3_json``), which reads the reply. A
  reply that begins with a tool call (``{``, ``[`` or ``<``, as Llama 3's
  JSON calls, Mistral's ``[TOOL_CALLS]`` and Hermes' ``<tool_call>`` do) is
  held back and parsed when it ends; any other reply streams as text.
  Without a parser the tools are left unused and the reply is text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from dreamsight_server.settings import SettingsError
from vision_service.domain import FinishReason, ToolCall, ToolChoice, ToolUse

_CALL_STARTS = "{[<"
"""First characters of the tool call formats that vLLM's parsers read."""


def new_call_id() -> str:
    """An id for a tool call (OpenAI's shape: call_ and 24 hex digits)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def template_tools(use: ToolUse) -> list[dict[str, Any]]:
    """The tools as chat templates take them (OpenAI's function tool shape)."""
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
            },
        }
        for t in use.tools
    ]


def template_arguments(text: str) -> Any:
    """A past tool call's arguments as templates take them: parsed JSON."""
    return json.loads(text)


def _vllm_request(use: ToolUse, model: str) -> Any:
    """vLLM's own request object, which its schema builder and parsers read."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    choice: Any = use.choice.value
    if use.choice is ToolChoice.FUNCTION:
        choice = {"type": "function", "function": {"name": use.function}}
    return ChatCompletionRequest(
        model=model,
        messages=[],
        tools=template_tools(use),
        tool_choice=choice,
        parallel_tool_calls=use.parallel,
    )


class ToolCalling:
    """The service's tool calling, built once at start from its settings."""

    def __init__(self, parser_name: str, tokenizer: Any, model: str) -> None:
        self.parser_name = parser_name
        self._model = model
        self._parser: Any = None
        if parser_name:
            from vllm.tool_parsers import ToolParserManager

            known = ToolParserManager.list_registered()
            if parser_name not in known:
                raise SettingsError(
                    f"--tool-call-parser: {parser_name!r} is not one of vLLM's tool call "
                    f"parsers ({', '.join(sorted(known))})"
                )
            try:
                self._parser = ToolParserManager.get_tool_parser(parser_name)(tokenizer)
            except (RuntimeError, ValueError, KeyError) as error:
                raise SettingsError(
                    f"--tool-call-parser: {parser_name} does not fit this model: {error}"
                ) from None

    def plan(self, use: ToolUse | None) -> ToolPlan | None:
        """What a request's tools do to its prompt, sampling and reply; None:
        nothing (no tools, or AUTO without a parser: the tools go unused)."""
        if use is None or (use.choice is ToolChoice.AUTO and self._parser is None):
            return None
        request = _vllm_request(use, self._model)
        if use.choice is ToolChoice.AUTO:
            request = self._parser.adjust_request(request)
            schema = None
        else:
            from vllm.tool_parsers.utils import get_json_schema_from_tools

            schema = get_json_schema_from_tools(
                request.tool_choice, request.tools, request.parallel_tool_calls
            )
        return ToolPlan(
            use=use,
            tools=template_tools(use),
            json_schema=schema if isinstance(schema, dict) else None,
            skip_special_tokens=bool(request.skip_special_tokens),
            _request=request,
            _parser=self._parser,
        )


@dataclass(frozen=True)
class ToolPlan:
    """One request's tool calling."""

    use: ToolUse
    tools: list[dict[str, Any]]
    """For the chat template."""
    json_schema: dict[str, Any] | None
    """The reply's structured-decoding schema (REQUIRED and FUNCTION)."""
    skip_special_tokens: bool
    """False where the parser reads special tokens (vLLM's adjust_request)."""
    _request: Any
    _parser: Any

    def reply(self) -> ToolReply:
        """A fresh reader of this request's reply."""
        return ToolReply(self)

    def parse(self, text: str) -> tuple[str, tuple[ToolCall, ...]]:
        """The content and tool calls of a whole reply that began like a call."""
        use = self.use
        if use.choice is ToolChoice.FUNCTION:
            return "", (ToolCall(new_call_id(), use.function, text),)
        if use.choice is ToolChoice.REQUIRED:
            calls = _required_calls(text)
            return ("", calls) if calls else (text, ())
        info = self._parser.extract_tool_calls(text, self._request)
        if not info.tools_called or not info.tool_calls:
            return text, ()
        calls = tuple(
            ToolCall(c.function.id or c.id or new_call_id(), c.function.name, c.function.arguments)
            for c in info.tool_calls
        )
        return info.content or "", calls


def _required_calls(text: str) -> tuple[ToolCall, ...]:
    """The calls of a REQUIRED reply: vLLM's JSON array of {name, parameters}."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return ()  # cut short (max_tokens, GPU budget): answered as text
    if not isinstance(value, list):
        return ()
    calls = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return ()
        arguments = json.dumps(item.get("parameters", {}), ensure_ascii=False)
        calls.append(ToolCall(new_call_id(), item["name"], arguments))
    return tuple(calls)


class ToolReply:
    """Reads one reply as it streams: which text to stream now, and at the
    end the content and tool calls."""

    def __init__(self, plan: ToolPlan) -> None:
        self._plan = plan
        self._held: list[str] = []
        self._streaming = False
        self._holding = plan.use.choice is not ToolChoice.AUTO

    def feed(self, text: str) -> str:
        """The text to stream now ("" holds it back)."""
        if self._streaming:
            return text
        self._held.append(text)
        if self._holding:
            return ""
        so_far = "".join(self._held)
        start = so_far.lstrip()
        if not start:
            return ""
        if start[0] in _CALL_STARTS:
            self._holding = True
            return ""
        self._streaming = True
        self._held = []
        return so_far

    def finish(self, reason: FinishReason) -> tuple[str, tuple[ToolCall, ...], FinishReason]:
        """The text not streamed yet (content, to stream last), the tool calls,
        and the finish reason (TOOL_CALLS where the model chose to call)."""
        held = "".join(self._held)
        self._held = []
        if not self._holding:
            return held, (), reason
        content, calls = self._plan.parse(held)
        if calls and not self._plan.use.parallel:
            calls = calls[:1]
        if (
            calls
            and reason is FinishReason.STOP
            and self._plan.use.choice is not ToolChoice.FUNCTION
        ):
            reason = FinishReason.TOOL_CALLS
        return content, calls, reason
