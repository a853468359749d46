"""Conversions between the client's types and protobuf, shared by both clients."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from dreamsight._types import (
    ApiKey,
    ChatChunk,
    ChatResponse,
    GeneratedImage,
    GenerateEvent,
    GenerateProgress,
    GenerateResult,
    ImageInput,
    JobEvent,
    Message,
    MessageLike,
    Model,
    Options,
    Tool,
    ToolCall,
    ToolChoice,
    TrainingJob,
    Usage,
    UsageWindow,
)
from dreamsight.common.v1 import common_pb2
from dreamsight.diffusion.v1 import diffusion_pb2
from dreamsight.gateway.v1 import admin_pb2, usage_pb2
from dreamsight.vision.v1 import vision_pb2

_ROLES = {
    "system": vision_pb2.ROLE_SYSTEM,
    "user": vision_pb2.ROLE_USER,
    "assistant": vision_pb2.ROLE_ASSISTANT,
    "tool": vision_pb2.ROLE_TOOL,
}
_TOOL_CHOICES = {
    "auto": vision_pb2.TOOL_CHOICE_MODE_AUTO,
    "none": vision_pb2.TOOL_CHOICE_MODE_NONE,
    "required": vision_pb2.TOOL_CHOICE_MODE_REQUIRED,
}
_FINISH = {
    vision_pb2.FINISH_REASON_STOP: "stop",
    vision_pb2.FINISH_REASON_LENGTH: "length",
    vision_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    vision_pb2.FINISH_REASON_GPU_BUDGET: "gpu_budget",
    vision_pb2.FINISH_REASON_CANCELLED: "cancelled",
    vision_pb2.FINISH_REASON_ERROR: "error",
}
_STATES = {
    diffusion_pb2.JOB_STATE_QUEUED: "queued",
    diffusion_pb2.JOB_STATE_RUNNING: "running",
    diffusion_pb2.JOB_STATE_SUCCEEDED: "succeeded",
    diffusion_pb2.JOB_STATE_FAILED: "failed",
    diffusion_pb2.JOB_STATE_CANCELLED: "cancelled",
}
_ORIGINS = {
    common_pb2.MODEL_ORIGIN_PRETRAINED: "pretrained",
    common_pb2.MODEL_ORIGIN_DEMO: "demo",
    common_pb2.MODEL_ORIGIN_FINE_TUNED: "fine_tuned",
}
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


def image(value: ImageInput) -> common_pb2.Image:
    """An image from a path, bytes or a PIL image."""
    if isinstance(value, bytes | bytearray | memoryview):
        return common_pb2.Image(data=bytes(value))
    if isinstance(value, str | os.PathLike):
        path = Path(value)
        return common_pb2.Image(
            data=path.read_bytes(), mime_type=_MIME.get(path.suffix.lower(), "")
        )
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
        out = io.BytesIO()
        value.save(out, format="PNG")
        return common_pb2.Image(data=out.getvalue(), mime_type="image/png")
    raise TypeError(f"an image must be a path, bytes or a PIL image, not {type(value).__name__}")


def message(value: MessageLike) -> vision_pb2.Message:
    """A chat message from a Message, a dict or a string."""
    if isinstance(value, str):
        value = Message(role="user", content=value)
    if isinstance(value, dict):
        value = Message(
            role=value.get("role", "user"),
            content=value.get("content", ""),
            images=tuple(value.get("images", ())),
            tool_calls=tuple(value.get("tool_calls", ())),
            tool_call_id=value.get("tool_call_id", ""),
            tool_name=value.get("tool_name", ""),
        )
    if value.role not in _ROLES:
        raise ValueError(f"role must be system, user, assistant or tool, not {value.role!r}")
    return vision_pb2.Message(
        role=_ROLES[value.role],
        content=value.content,
        images=[image(i) for i in value.images],
        tool_calls=[
            vision_pb2.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments)
            for c in value.tool_calls
        ],
        tool_call_id=value.tool_call_id,
        tool_name=value.tool_name,
    )


def tool(value: Tool) -> vision_pb2.Tool:
    """A tool declaration."""
    return vision_pb2.Tool(
        name=value.name,
        description=value.description,
        parameters_json=json.dumps(value.parameters) if value.parameters is not None else "",
    )


def tool_choice(value: ToolChoice | None) -> vision_pb2.ToolChoice:
    """auto, none, required, or one Tool to call."""
    if value is None:
        return vision_pb2.ToolChoice()
    if isinstance(value, Tool):
        return vision_pb2.ToolChoice(
            mode=vision_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name=value.name
        )
    if value not in _TOOL_CHOICES:
        raise ValueError(f"tool_choice must be auto, none, required or a Tool, not {value!r}")
    return vision_pb2.ToolChoice(mode=_TOOL_CHOICES[value])


def chat_request(
    model: str,
    messages: Sequence[MessageLike] | MessageLike,
    options: Options | None,
    request_id: str,
    tools: Sequence[Tool] = (),
    choice: ToolChoice | None = None,
) -> vision_pb2.ChatRequest:
    """A ChatRequest."""
    opts = vision_pb2.ChatOptions()
    for key, value in (options or {}).items():
        if key == "stop":
            opts.stop.extend(str(s) for s in value)  # type: ignore[attr-defined]
        elif key == "format":
            if value == "json":
                opts.response_format.type = vision_pb2.RESPONSE_FORMAT_TYPE_JSON
            elif isinstance(value, dict):
                opts.response_format.type = vision_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
                opts.response_format.json_schema = json.dumps(value)
        else:
            setattr(opts, key, value)
    if isinstance(messages, str | Message | dict):
        messages = [messages]
    return vision_pb2.ChatRequest(
        model=model,
        messages=[message(m) for m in messages],
        options=opts,
        request_id=request_id,
        tools=[tool(t) for t in tools],
        tool_choice=tool_choice(choice),
    )


def chat_response(final: vision_pb2.ChatFinal) -> ChatResponse:
    """The finished reply."""
    return ChatResponse(
        text=final.text,
        finish_reason=_FINISH.get(final.finish_reason, "error"),
        prompt_tokens=final.prompt_tokens,
        completion_tokens=final.completion_tokens,
        time_to_first_token=final.time_to_first_token.ToNanoseconds() / 1e9,
        total_time=final.usage.total_time.ToNanoseconds() / 1e9,
        gpu_seconds=final.usage.gpu_seconds,
        model=final.model,
        raw=final,
        tool_calls=tuple(ToolCall(c.id, c.name, c.arguments_json) for c in final.tool_calls),
    )


def chat_chunk(response: vision_pb2.ChatResponse) -> ChatChunk:
    """One stream message."""
    if response.WhichOneof("event") == "final":
        final = chat_response(response.final)
        return ChatChunk(text="", done=True, response=final, raw=response)
    return ChatChunk(text=response.delta, raw=response)


def generate_request(request_id: str, **kwargs: Any) -> diffusion_pb2.GenerateRequest:
    """A GenerateRequest; None values stay unset."""
    fields = {k: v for k, v in kwargs.items() if v is not None}
    return diffusion_pb2.GenerateRequest(request_id=request_id, **fields)


def generate_event(response: diffusion_pb2.GenerateResponse) -> GenerateEvent:
    """Progress or the result."""
    if response.WhichOneof("event") == "progress":
        return GenerateProgress(response.progress.step, response.progress.total_steps)
    result = response.result
    return GenerateResult(
        images=tuple(GeneratedImage(i.image.data, i.seed) for i in result.images),
        gpu_seconds=result.usage.gpu_seconds,
        total_time=result.usage.total_time.ToNanoseconds() / 1e9,
        model=result.model,
        raw=result,
    )


def _time(stamp: Any, present: bool = True) -> datetime | None:
    if not present or (stamp.seconds == 0 and stamp.nanos == 0):
        return None
    return datetime.fromtimestamp(stamp.ToNanoseconds() / 1e9, UTC)


_TUNE_KINDS = {"lora": diffusion_pb2.TUNE_KIND_LORA, "full": diffusion_pb2.TUNE_KIND_FULL}
_TUNES: dict[int, Literal["", "lora", "full"]] = {
    diffusion_pb2.TUNE_KIND_LORA: "lora",
    diffusion_pb2.TUNE_KIND_FULL: "full",
}


def training_spec(**kwargs: Any) -> diffusion_pb2.TrainingSpec:
    """A TrainingSpec; images may be paths, bytes or PIL images; kind is
    "lora" or "full"."""
    images = [image(i) for i in kwargs.pop("instance_images")]
    kind = kwargs.pop("kind", None)
    if kind is not None:
        if kind not in _TUNE_KINDS:
            raise ValueError(f"kind must be 'lora' or 'full', not {kind!r}")
        kwargs["kind"] = _TUNE_KINDS[kind]
    fields = {k: v for k, v in kwargs.items() if v is not None}
    return diffusion_pb2.TrainingSpec(instance_images=images, **fields)


def training_job(job: diffusion_pb2.TrainingJob) -> TrainingJob:
    """A job."""
    return TrainingJob(
        job_id=job.job_id,
        state=_STATES.get(job.state, "unknown"),
        step=job.step,
        total_steps=job.spec.max_train_steps,
        model=job.model,
        reason=job.reason,
        gpu_seconds=job.usage.gpu_seconds,
        created=_time(job.create_time, job.HasField("create_time")),
        ended=_time(job.end_time, job.HasField("end_time")),
        raw=job,
    )


def job_event(event: diffusion_pb2.WatchTrainingJobResponse) -> JobEvent:
    """One training event."""
    kind = event.WhichOneof("event") or "unknown"
    base: dict[str, Any] = {
        "kind": kind,
        "state": _STATES.get(event.state, "unknown"),
        "time": _time(event.time, event.HasField("time")),
        "raw": event,
    }
    if kind == "class_images":
        base.update(done=event.class_images.done, total=event.class_images.total)
    elif kind == "training_step":
        step = event.training_step
        base.update(
            step=step.step,
            total_steps=step.total_steps,
            loss=step.loss,
            learning_rate=step.learning_rate,
            eta_seconds=step.eta.ToNanoseconds() / 1e9,
        )
    elif kind == "checkpoint_saved":
        base.update(step=event.checkpoint_saved.step)
    elif kind == "validation_image":
        base.update(step=event.validation_image.step, image_png=event.validation_image.image.data)
    elif kind == "succeeded":
        base.update(model=event.succeeded.model)
    elif kind == "failed":
        base.update(reason=event.failed.reason)
    return JobEvent(**base)


def vision_model(model: vision_pb2.VisionModel) -> Model:
    """A chat model."""
    return Model(
        name=model.name,
        kind="vision",
        demo=model.demo,
        origin=_ORIGINS.get(model.origin, "pretrained"),
        source=model.source,
        context_length=model.context_length,
        max_images_per_request=model.max_images_per_request,
        raw=model,
    )


def diffusion_model(model: diffusion_pb2.DiffusionModel) -> Model:
    """An image model."""
    return Model(
        name=model.name,
        kind="diffusion",
        demo=model.demo,
        origin=_ORIGINS.get(model.origin, "pretrained"),
        source=model.source,
        base_model=model.base_model,
        tune=_TUNES.get(model.kind, ""),
        size_bytes=model.size_bytes,
        raw=model,
    )


def usage(response: usage_pb2.GetUsageResponse) -> Usage:
    """The caller's usage."""
    return Usage(
        tenant=response.tenant,
        tier=response.tier,
        max_concurrent_requests=response.max_concurrent_requests,
        requests_in_flight=response.requests_in_flight,
        max_concurrent_training_jobs=response.max_concurrent_training_jobs,
        training_jobs_running=response.training_jobs_running,
        windows=tuple(
            UsageWindow(w.name, w.limit_gpu_seconds, w.used_gpu_seconds, _time(w.reset_time))
            for w in response.windows
        ),
        raw=response,
    )


def api_key(key: admin_pb2.ApiKey) -> ApiKey:
    """A stored key."""
    return ApiKey(
        key_id=key.key_id,
        tenant=key.tenant,
        tier=key.tier,
        description=key.description,
        created=_time(key.create_time, key.HasField("create_time")),
        revoked=_time(key.revoke_time, key.HasField("revoke_time")),
    )
