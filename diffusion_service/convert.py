"""The only diffusion module that touches protobuf: validate and convert.

Requests become neutral :mod:`diffusion_service.domain` types after every
check that does not need the model (each error names its field); the engine
does the rest (model, tenancy, prompt tokens). Engine events become
``GenerateResponse`` messages.
"""

from __future__ import annotations

import math

from dreamsight.common.v1 import common_pb2
from dreamsight.diffusion.v1 import diffusion_pb2
from google.protobuf import duration_pb2

from diffusion_service.config import Limits
from diffusion_service.domain import (
    GenerateDone,
    GenerateEvent,
    GenerateInput,
    ModelInfo,
    Origin,
    Progress,
    Scheduler,
)
from dreamsight_server.errors import InvalidArgument

# Far above the 77-token limit the engine enforces; this only keeps a huge
# prompt from being tokenized at all.
MAX_PROMPT_CHARS = 4096
MAX_REQUEST_ID_CHARS = 128
MAX_SEED = 2**63 - 1
_SCHEDULERS = {s.value: s for s in Scheduler}
_ORIGINS = {
    Origin.PRETRAINED: common_pb2.MODEL_ORIGIN_PRETRAINED,
    Origin.DEMO: common_pb2.MODEL_ORIGIN_DEMO,
    Origin.FINE_TUNED: common_pb2.MODEL_ORIGIN_FINE_TUNED,
}


def generate_input(request: diffusion_pb2.GenerateRequest, limits: Limits) -> GenerateInput:
    """Validate a GenerateRequest and convert it; raises InvalidArgument."""
    if not request.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty")
    for field, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidArgument(field, f"longer than {MAX_PROMPT_CHARS} characters")
    width = _size(request, "width", limits)
    height = _size(request, "height", limits)
    steps = None
    if request.HasField("steps"):
        steps = request.steps
        if not 1 <= steps <= limits.max_steps:
            raise InvalidArgument("steps", f"{steps} is outside 1 to {limits.max_steps}")
    guidance = None
    if request.HasField("guidance_scale"):
        guidance = float(request.guidance_scale)
        if not math.isfinite(guidance) or not 0 <= guidance <= limits.max_guidance_scale:
            raise InvalidArgument(
                "guidance_scale",
                f"{guidance} is not a finite number from 0 to {limits.max_guidance_scale:g} "
                "(<= 1 disables guidance)",
            )
    scheduler = None
    if request.scheduler:
        scheduler = _SCHEDULERS.get(request.scheduler)
        if scheduler is None:
            raise InvalidArgument(
                "scheduler",
                f"unknown scheduler {request.scheduler!r}; use one of {', '.join(_SCHEDULERS)} "
                "or leave it empty for the model's own",
            )
    num_images = 1
    if request.HasField("num_images"):
        num_images = request.num_images
        if not 1 <= num_images <= limits.max_images:
            raise InvalidArgument(
                "num_images", f"{num_images} is outside 1 to {limits.max_images} per request"
            )
    seed = None
    if request.HasField("seed"):
        seed = request.seed
        if not 0 <= seed <= MAX_SEED - (num_images - 1):
            raise InvalidArgument(
                "seed", f"{seed} is outside 0 to 2^63-{num_images} (image i uses seed + i)"
            )
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
    return GenerateInput(
        model=request.model,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        seed=seed,
        num_images=num_images,
        request_id=request.request_id,
    )


def _size(request: diffusion_pb2.GenerateRequest, field: str, limits: Limits) -> int | None:
    if not request.HasField(field):  # type: ignore[arg-type]
        return None
    value = int(getattr(request, field))
    if value % 8:
        raise InvalidArgument(field, f"{value} is not a multiple of 8")
    if not limits.min_size <= value <= limits.max_size:
        raise InvalidArgument(
            field, f"{value} is outside {limits.min_size} to {limits.max_size} pixels"
        )
    return value


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def generate_response(event: GenerateEvent) -> diffusion_pb2.GenerateResponse:
    """One stream message for an engine event."""
    if isinstance(event, Progress):
        return diffusion_pb2.GenerateResponse(
            progress=diffusion_pb2.GenerateProgress(step=event.step, total_steps=event.total_steps)
        )
    return diffusion_pb2.GenerateResponse(result=generate_result(event))


def generate_result(done: GenerateDone) -> diffusion_pb2.GenerateResult:
    """The last message of a stream."""
    return diffusion_pb2.GenerateResult(
        images=[
            diffusion_pb2.GeneratedImage(
                image=common_pb2.Image(data=image.png, mime_type="image/png"), seed=image.seed
            )
            for image in done.images
        ],
        usage=common_pb2.Usage(gpu_seconds=done.gpu_seconds, total_time=_duration(done.total_s)),
        model=done.model,
    )


def diffusion_model(info: ModelInfo) -> diffusion_pb2.DiffusionModel:
    """One ListModels entry."""
    return diffusion_pb2.DiffusionModel(
        name=info.name,
        origin=_ORIGINS[info.origin],
        demo=info.demo,
        base_model=info.base_model,
        default_width=info.default_width,
        default_height=info.default_height,
        job_id=info.job_id,
        source=info.source,
    )


def list_models_response(infos: list[ModelInfo]) -> diffusion_pb2.ListModelsResponse:
    """The ListModels answer."""
    return diffusion_pb2.ListModelsResponse(models=[diffusion_model(i) for i in infos])
