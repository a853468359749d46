"""What each HTTP endpoint does with each body field: the one table that the
handlers check bodies against, the contract tests list and README's
compatibility table is generated from (``python -m gateway.http_api.fields``).

Every field a body may carry is either applied (it changes what the call
does, as the API defines it) or refused with a 400 that names it, unless it
holds the value that means "not asked for". A field the table does not know
is refused too, as OpenAI's own API does: a field silently dropped would be
a wrong answer, not compatibility.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dreamsight_server.errors import InvalidArgument


@dataclass(frozen=True)
class Applied:
    """A field the endpoint applies."""

    how: str


@dataclass(frozen=True)
class Refused:
    """A field the endpoint cannot apply: a 400 naming it, unless its value is one
    of ``allowed`` (or empty), which asks for nothing."""

    why: str
    allowed: tuple[Any, ...] = ()
    empty_ok: bool = True

    def refuses(self, value: Any) -> bool:
        """Whether value asks for what cannot be done."""
        if value is None or (self.empty_ok and value in (False, "", [], {})):
            return False
        return not any(type(value) is type(a) and value == a for a in self.allowed)


Spec = Applied | Refused


@dataclass(frozen=True)
class Fields:
    """The fields of one JSON object of an endpoint's body."""

    title: str
    """Where these fields live, as the README's table names it."""
    specs: Mapping[str, Spec]
    nested: Mapping[str, Fields] = field(default_factory=dict)
    """Fields whose value is an object with fields of its own."""

    def check(self, body: Mapping[str, Any], prefix: str = "") -> None:
        """InvalidArgument for the first unknown or refused field."""
        for key, value in body.items():
            name = f"{prefix}{key}"
            spec = self.specs.get(key)
            if spec is None:
                known = ", ".join(sorted(self.specs))
                raise InvalidArgument(name, f"is not a field of {self.title} (known: {known})")
            if isinstance(spec, Refused) and spec.refuses(value):
                raise InvalidArgument(name, f"is not supported by dreamsight: {spec.why}")
            inner = self.nested.get(key)
            if inner is not None and isinstance(value, dict):
                inner.check(value, f"{name}.")


# --- shared pieces ------------------------------------------------------------

_TOOLS = (
    "function tools: called when tool_choice is required or names one (on every model, by "
    "structured decoding); with auto, called where the vision service runs a tool call "
    "parser for the model (--tool-call-parser), else left unused"
)
_LEGACY_FUNCTIONS = "OpenAI's deprecated functions: send tools"
_USER = "accepted: OpenAI's end-user id for its abuse reports; dreamsight accounts by key"
_VLLM_APPLIED: dict[str, Spec] = {
    "top_k": Applied("vLLM's: sample among the k likeliest tokens"),
    "min_p": Applied("vLLM's: minimum probability relative to the likeliest token"),
    "repetition_penalty": Applied("vLLM's: penalty for repeated tokens"),
    "ignore_eos": Applied("vLLM's: generate past end-of-sequence, up to max_tokens"),
    "min_tokens": Applied("vLLM's: generate at least this many tokens"),
}
_VLLM_REFUSED: dict[str, Spec] = {
    name: Refused(
        "a vLLM sampling extension the gateway does not pass on", allowed, empty_ok=not allowed
    )
    for name, allowed in {
        "use_beam_search": (),
        "length_penalty": (1, 1.0),
        "stop_token_ids": (),
        "include_stop_str_in_output": (),
        "skip_special_tokens": (True,),  # False asks for something: refused
        "spaces_between_special_tokens": (True,),
        "truncate_prompt_tokens": (),
        "prompt_logprobs": (),
        "allowed_token_ids": (),
        "bad_words": (),
        "structured_outputs": (),
        "guided_json": (),
        "guided_regex": (),
        "guided_choice": (),
        "guided_grammar": (),
        "guided_decoding_backend": (),
        "priority": (0,),
        "return_tokens_as_token_ids": (),
        "cache_salt": (),
        "kv_transfer_params": (),
        "vllm_xargs": (),
        "logits_processors": (),
        "request_id": (),
    }.items()
}
_OPENAI_SAMPLING: dict[str, Spec] = {
    "model": Applied("the served model, as /v1/models lists it"),
    "stream": Applied("server-sent events, ending with data: [DONE]"),
    "max_tokens": Applied("the most tokens to generate"),
    "temperature": Applied("sampling temperature, 0 to 2 (0: greedy)"),
    "top_p": Applied("nucleus sampling"),
    "presence_penalty": Applied("-2 to 2"),
    "frequency_penalty": Applied("-2 to 2"),
    "seed": Applied("reproducible sampling"),
    "stop": Applied("up to 16 stop strings"),
    "n": Refused("one choice per request", (1,), empty_ok=False),
    "user": Applied(_USER),
    "logprobs": Refused("log probabilities are not returned"),
    "top_logprobs": Refused("log probabilities are not returned", (0,)),
    "logit_bias": Refused("logit bias is not passed on"),
    "service_tier": Refused("tiers come from the API key", ("auto", "default")),
    **_VLLM_APPLIED,
    **_VLLM_REFUSED,
}
_STREAM_OPTIONS = Fields(
    "stream_options",
    {
        "include_usage": Applied("usage in a last chunk"),
        "continuous_usage_stats": Applied(
            "vLLM's: with include_usage, usage so far on every chunk"
        ),
    },
)
_RUNNER = "a runner setting: the served model's own settings apply"
OLLAMA_OPTIONS = Fields(
    "options",
    {
        "temperature": Applied("sampling temperature (0: greedy)"),
        "top_p": Applied("nucleus sampling"),
        "top_k": Applied("sample among the k likeliest tokens"),
        "min_p": Applied("minimum probability relative to the likeliest token"),
        "seed": Applied("reproducible sampling (-1: random)"),
        "num_predict": Applied("the most tokens to generate (-1, -2: until done)"),
        "stop": Applied("stop strings"),
        "repeat_penalty": Applied("penalty for repeated tokens"),
        "presence_penalty": Applied("-2 to 2"),
        "frequency_penalty": Applied("-2 to 2"),
        "ignore_eos": Applied("vLLM's: generate past end-of-sequence, up to num_predict"),
        "min_tokens": Applied("vLLM's: generate at least this many tokens"),
        **{
            name: Applied(_RUNNER)
            for name in (
                "num_ctx",
                "num_batch",
                "num_gpu",
                "main_gpu",
                "num_thread",
                "num_keep",
                "use_mmap",
                "use_mlock",
                "numa",
                "low_vram",
                "vocab_only",
                "f16_kv",
            )
        },
        "typical_p": Refused("typical sampling is not passed on", (1, 1.0)),
        "repeat_last_n": Refused("the penalty window is the whole reply", (64, -1)),
        "tfs_z": Refused("tail-free sampling is not passed on", (1, 1.0)),
        "mirostat": Refused("mirostat sampling is not passed on", (0,)),
        "mirostat_tau": Refused("mirostat sampling is not passed on", (5, 5.0)),
        "mirostat_eta": Refused("mirostat sampling is not passed on", (0.1,)),
        "penalize_newline": Refused("newlines are penalized like any token"),
    },
)

# --- the endpoints -------------------------------------------------------------

OPENAI_CHAT = Fields(
    "POST /v1/chat/completions",
    {
        **_OPENAI_SAMPLING,
        "messages": Applied(
            "system, developer, user, assistant (with tool_calls) and tool turns; text and "
            "image parts"
        ),
        "max_completion_tokens": Applied("the most tokens to generate"),
        "stream_options": Applied("include_usage"),
        "response_format": Applied("text, json_object or json_schema"),
        "tools": Applied(_TOOLS),
        "tool_choice": Applied('auto, none, required or {"type": "function", ...}'),
        "parallel_tool_calls": Applied("false: at most one tool call"),
        "functions": Refused(_LEGACY_FUNCTIONS),
        "function_call": Refused(_LEGACY_FUNCTIONS, ("auto", "none")),
        "audio": Refused("audio is not supported"),
        "modalities": Refused("replies are text", (["text"],)),
        "prediction": Refused("predicted outputs are not supported"),
        "web_search_options": Refused("the gateway searches nothing"),
        "reasoning_effort": Refused("the served models do not reason"),
        "store": Refused("completions are not stored"),
        "metadata": Refused("completions are not stored, so there is nothing to tag"),
        "echo": Refused("the prompt is not echoed"),
        "add_generation_prompt": Refused("the template always adds it", (True,), empty_ok=False),
        "continue_final_message": Refused("replies start a new assistant turn"),
        "chat_template": Refused("the served model's own template applies"),
        "chat_template_kwargs": Refused("the served model's own template applies"),
        "documents": Refused("the served model's own template applies"),
        "mm_processor_kwargs": Refused("the served model's processor settings apply"),
        "best_of": Refused("one candidate per request", (1,)),
    },
    {"stream_options": _STREAM_OPTIONS},
)

OPENAI_COMPLETIONS = Fields(
    "POST /v1/completions",
    {
        **_OPENAI_SAMPLING,
        "prompt": Applied("one text prompt (or a list of one), continued without a template"),
        "max_tokens": Applied("the most tokens to generate (16 if unset, as OpenAI's)"),
        "stream_options": Applied("include_usage"),
        "echo": Refused("the prompt is not echoed"),
        "suffix": Refused("insertion is not supported"),
        "best_of": Refused("one candidate per request", (1,)),
    },
    {"stream_options": _STREAM_OPTIONS},
)

OPENAI_IMAGES = Fields(
    "POST /v1/images/generations",
    {
        "model": Applied("the image model (the default base model if unset)"),
        "prompt": Applied("what to draw"),
        "n": Applied("how many images"),
        "size": Applied('"WIDTHxHEIGHT" in pixels, or "auto"'),
        "response_format": Applied("b64_json only"),
        "user": Applied(_USER),
        "negative_prompt": Applied("dreamsight's: what not to draw"),
        "steps": Applied("dreamsight's: denoising steps"),
        "guidance_scale": Applied("dreamsight's: classifier-free guidance"),
        "seed": Applied("dreamsight's: reproducible images"),
        "scheduler": Applied("dreamsight's: the sampler"),
        "quality": Refused("one quality", ("auto", "standard")),
        "style": Refused("style presets are not supported"),
        "background": Refused("backgrounds are drawn", ("auto",)),
        "moderation": Refused("no moderation setting", ("auto",)),
        "output_format": Refused("images are PNG", ("png",)),
        "output_compression": Refused("images are PNG"),
        "partial_images": Refused("images come whole", (0,)),
        "stream": Refused("images come whole"),
    },
)

_OLLAMA_COMMON: dict[str, Spec] = {
    "model": Applied("the served model (Ollama's :latest tag allowed)"),
    "stream": Applied("NDJSON, one object a line (false: one object)"),
    "format": Applied('"json" or a JSON schema'),
    "options": Applied("sampling options, below"),
    "keep_alive": Applied("accepted: served models stay loaded"),
    "think": Refused("the served models do not think"),
    "logprobs": Refused("log probabilities are not returned"),
    "top_logprobs": Refused("log probabilities are not returned", (0,)),
}

OLLAMA_CHAT = Fields(
    "POST /api/chat",
    {
        **_OLLAMA_COMMON,
        "messages": Applied(
            "system, user, assistant (with tool_calls) and tool turns; base64 images"
        ),
        "tools": Applied(
            "function tools, called where the vision service runs a tool call parser for the "
            "model (--tool-call-parser), else left unused (Ollama has no tool_choice)"
        ),
    },
    {"options": OLLAMA_OPTIONS},
)

OLLAMA_GENERATE = Fields(
    "POST /api/generate",
    {
        **_OLLAMA_COMMON,
        "prompt": Applied("the user's turn (no prompt and no images: the load call)"),
        "images": Applied("base64 images"),
        "system": Applied("a system turn before the prompt"),
        "raw": Applied("the prompt continued as it stands, without the template"),
        "suffix": Refused("insertion is not supported"),
        "template": Refused("the served model's own template applies"),
        "context": Refused("pass the conversation to /api/chat instead"),
    },
    {"options": OLLAMA_OPTIONS},
)

OLLAMA_SHOW = Fields(
    "POST /api/show",
    {
        "model": Applied("the model to describe"),
        "name": Applied("the model to describe (Ollama's older name for model)"),
        "verbose": Applied("accepted: the full description is always given"),
    },
)

ENDPOINTS: tuple[Fields, ...] = (
    OLLAMA_CHAT,
    OLLAMA_GENERATE,
    OLLAMA_SHOW,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_IMAGES,
)


def compatibility_table() -> str:
    """README's table of fields, applied and refused, for every endpoint."""
    lines = ["| endpoint | applied | refused with a 400 naming the field |", "|---|---|---|"]
    for endpoint in ENDPOINTS:
        for fields in (endpoint, *endpoint.nested.values()):
            title = endpoint.title if fields is endpoint else f"{endpoint.title}: `{fields.title}`"
            applied = [f"`{k}`" for k, s in fields.specs.items() if isinstance(s, Applied)]
            refused = [f"`{k}`" for k, s in fields.specs.items() if isinstance(s, Refused)]
            lines.append(f"| {title} | {', '.join(applied)} | {', '.join(refused) or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(compatibility_table())
