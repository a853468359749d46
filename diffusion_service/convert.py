"""The only diffusion module that touches protobuf: validate and convert.

Requests become neutral :mod:`diffusion_service.domain` types after every
check that does not need the model (each error names its field); the engine
does the rest (model, tenancy, prompt tokens). Engine events become
``GenerateResponse`` messages; training jobs and their events become
``TrainingJob`` and ``WatchTrainingJobResponse`` messages.

TrainingSpec's numbers follow proto3: zero means "not set", so a zero
``max_train_steps``, ``learning_rate``, ``prior_loss_weight``,
``resolution`` or ``checkpoint_interval`` takes the DreamBooth defaults
file's value, while ``num_class_images = 0`` turns prior preservation off and
``train_text_encoder`` is taken as sent. An unspecified ``kind`` is LoRA;
the LoRA fields (``rank``, ``lora_alpha``, ``lora_layers``,
``train_text_encoder_lora``) are refused on a full tune, and
``train_text_encoder`` (the whole encoder) on a LoRA one.
"""

from __future__ import annotations

import math

from dreamsight.common.v1 import common_pb2
from dreamsight.diffusion.v1 import diffusion_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from diffusion_service.config import Limits, TrainingLimits
from diffusion_service.domain import (
    CheckpointSaved,
    ClassImagesProgress,
    GenerateDone,
    GenerateEvent,
    GenerateInput,
    JobCancelled,
    JobEvent,
    JobFailed,
    JobQueued,
    JobState,
    JobSucceeded,
    ModelInfo,
    Origin,
    Progress,
    Scheduler,
    TrainingInput,
    TrainingJobInfo,
    TrainingStep,
    TuneKind,
    ValidationImage,
)
from diffusion_service.dreambooth.params import UNET_LORA_LAYERS
from dreamsight_server.errors import InvalidArgument
from dreamsight_server.images import decode_image
from dreamsight_server.tenancy import public_source

# Far above the 77-token limit the engine enforces; this only keeps a huge
# prompt from being tokenized at all.
MAX_PROMPT_CHARS = 4096
MAX_REQUEST_ID_CHARS = 128
MAX_SEED = 2**63 - 1
_SCHEDULERS = {s.value: s for s in Scheduler}
# Seeds reach pytorch_lightning.seed_everything, which takes 32 bits.
MAX_TRAINING_SEED = 2**32 - 1
MAX_MODEL_NAME_CHARS = 100
_STATES = {
    JobState.QUEUED: diffusion_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: diffusion_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: diffusion_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: diffusion_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: diffusion_pb2.JOB_STATE_CANCELLED,
}
_ORIGINS = {
    Origin.PRETRAINED: common_pb2.MODEL_ORIGIN_PRETRAINED,
    Origin.DEMO: common_pb2.MODEL_ORIGIN_DEMO,
    Origin.FINE_TUNED: common_pb2.MODEL_ORIGIN_FINE_TUNED,
}
_KINDS = {TuneKind.LORA: diffusion_pb2.TUNE_KIND_LORA, TuneKind.FULL: diffusion_pb2.TUNE_KIND_FULL}
_KINDS_BACK = {
    diffusion_pb2.TUNE_KIND_UNSPECIFIED: TuneKind.LORA,
    diffusion_pb2.TUNE_KIND_LORA: TuneKind.LORA,
    diffusion_pb2.TUNE_KIND_FULL: TuneKind.FULL,
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
        source=public_source(info.source),
        kind=_KINDS[info.kind] if info.kind is not None else diffusion_pb2.TUNE_KIND_UNSPECIFIED,
        size_bytes=info.size_bytes,
    )


def list_models_response(infos: list[ModelInfo]) -> diffusion_pb2.ListModelsResponse:
    """The ListModels answer."""
    return diffusion_pb2.ListModelsResponse(models=[diffusion_model(i) for i in infos])


def training_input(
    request: diffusion_pb2.CreateTrainingJobRequest, limits: TrainingLimits
) -> TrainingInput:
    """Validate a CreateTrainingJobRequest and convert it; raises InvalidArgument.

    Decodes every instance image (within the limits) to prove it usable, so
    call it off the event loop. Fields are named by their path in the
    request (``spec.instance_images[2]``).
    """
    if not request.HasField("spec"):
        raise InvalidArgument("spec", "is required")
    spec = request.spec
    count = len(spec.instance_images)
    if not 1 <= count <= limits.max_instance_images:
        raise InvalidArgument(
            "spec.instance_images",
            f"{count} images; send 1 to {limits.max_instance_images} (3 to 5 work best)",
        )
    for i, image in enumerate(spec.instance_images):
        decode_image(image.data, limits.images, f"spec.instance_images[{i}]")
    if not spec.instance_prompt.strip():
        raise InvalidArgument("spec.instance_prompt", "must not be empty")
    for name in ("instance_prompt", "class_prompt", "validation_prompt"):
        if len(getattr(spec, name)) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"spec.{name}", f"longer than {MAX_PROMPT_CHARS} characters")
    if spec.num_class_images > limits.max_class_images:
        raise InvalidArgument(
            "spec.num_class_images",
            f"{spec.num_class_images} is over the limit of {limits.max_class_images}",
        )
    if spec.num_class_images and not spec.class_prompt.strip():
        raise InvalidArgument(
            "spec.class_prompt", "must not be empty when num_class_images is above 0"
        )
    weight = _optional_number(
        "spec.prior_loss_weight", spec.prior_loss_weight, limits.max_prior_loss_weight
    )
    rate = _optional_number("spec.learning_rate", spec.learning_rate, limits.max_learning_rate)
    if spec.max_train_steps > limits.max_train_steps:
        raise InvalidArgument(
            "spec.max_train_steps",
            f"{spec.max_train_steps} is over the limit of {limits.max_train_steps}",
        )
    if spec.checkpoint_interval > limits.max_train_steps:
        raise InvalidArgument(
            "spec.checkpoint_interval",
            f"{spec.checkpoint_interval} is over the limit of {limits.max_train_steps}",
        )
    if spec.resolution and (
        spec.resolution % 8 or not limits.min_resolution <= spec.resolution <= limits.max_resolution
    ):
        raise InvalidArgument(
            "spec.resolution",
            f"{spec.resolution} is not a multiple of 8 from {limits.min_resolution} to "
            f"{limits.max_resolution} (or 0 for the default)",
        )
    if not 0 <= spec.seed <= MAX_TRAINING_SEED:
        raise InvalidArgument("spec.seed", f"{spec.seed} is outside 0 to {MAX_TRAINING_SEED}")
    if len(spec.output_model_name) > MAX_MODEL_NAME_CHARS:
        raise InvalidArgument(
            "spec.output_model_name", f"longer than {MAX_MODEL_NAME_CHARS} characters"
        )
    kind = _lora_checks(spec, limits)
    crid = request.client_request_id
    if len(crid) > MAX_REQUEST_ID_CHARS or not crid.isprintable():
        raise InvalidArgument(
            "client_request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable characters"
        )
    return TrainingInput(
        base_model=spec.base_model,
        instance_images=tuple(bytes(i.data) for i in spec.instance_images),
        instance_prompt=spec.instance_prompt,
        class_prompt=spec.class_prompt if spec.num_class_images else "",
        num_class_images=spec.num_class_images,
        prior_loss_weight=weight,
        max_train_steps=spec.max_train_steps or None,
        learning_rate=rate,
        train_text_encoder=spec.train_text_encoder,
        resolution=spec.resolution or None,
        seed=spec.seed,
        checkpoint_interval=spec.checkpoint_interval or None,
        validation_prompt=spec.validation_prompt,
        output_model_name=spec.output_model_name,
        client_request_id=crid,
        kind=kind,
        rank=spec.rank or None,
        lora_alpha=float(spec.lora_alpha) or None,
        lora_layers=tuple(spec.lora_layers),
        train_text_encoder_lora=spec.train_text_encoder_lora,
    )


def _lora_checks(spec: diffusion_pb2.TrainingSpec, limits: TrainingLimits) -> TuneKind:
    """The kind of tune, after checking the fields that belong to one kind only."""
    if spec.kind not in _KINDS_BACK:
        raise InvalidArgument("spec.kind", f"{spec.kind} is not a TuneKind")
    kind = _KINDS_BACK[spec.kind]
    if kind is TuneKind.FULL:
        for name in ("rank", "lora_alpha", "lora_layers", "train_text_encoder_lora"):
            if getattr(spec, name):
                raise InvalidArgument(f"spec.{name}", "applies to LoRA only; kind is FULL")
        return kind
    if spec.train_text_encoder:
        raise InvalidArgument(
            "spec.train_text_encoder",
            "trains the whole text encoder, which only kind FULL does; a LoRA job sets "
            "train_text_encoder_lora",
        )
    if spec.rank > limits.max_lora_rank:
        raise InvalidArgument(
            "spec.rank", f"{spec.rank} is over the limit of {limits.max_lora_rank} (0: default)"
        )
    _optional_number("spec.lora_alpha", spec.lora_alpha, limits.max_lora_alpha)
    if len(spec.lora_layers) > len(UNET_LORA_LAYERS):
        raise InvalidArgument("spec.lora_layers", f"at most {len(UNET_LORA_LAYERS)} names")
    for i, layer in enumerate(spec.lora_layers):
        if layer not in UNET_LORA_LAYERS:
            raise InvalidArgument(
                f"spec.lora_layers[{i}]",
                f"{layer[:40]!r} is not one of {', '.join(UNET_LORA_LAYERS)}",
            )
    return kind


def _optional_number(field: str, value: float, maximum: float) -> float | None:
    """A positive number up to maximum, or None for 0 (the default)."""
    if not math.isfinite(value) or not 0 <= value <= maximum:
        raise InvalidArgument(
            field, f"{value} is not a finite number from 0 (the default) to {maximum:g}"
        )
    return float(value) or None


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def training_job(info: TrainingJobInfo) -> diffusion_pb2.TrainingJob:
    """A job as the API reports it: its resolved settings, images omitted."""
    s = info.settings
    job = diffusion_pb2.TrainingJob(
        job_id=info.job_id,
        state=_STATES[info.state],
        spec=diffusion_pb2.TrainingSpec(
            base_model=s.base_model,
            instance_prompt=s.instance_prompt,
            class_prompt=s.class_prompt,
            num_class_images=s.num_class_images,
            prior_loss_weight=s.prior_loss_weight,
            max_train_steps=s.max_train_steps,
            learning_rate=s.learning_rate,
            train_text_encoder=s.train_text_encoder,
            resolution=s.resolution,
            seed=s.seed,
            checkpoint_interval=s.checkpoint_interval,
            validation_prompt=s.validation_prompt,
            output_model_name=s.output_model_name,
            kind=_KINDS[s.kind],
            rank=s.rank,
            lora_alpha=s.lora_alpha,
            lora_layers=s.lora_layers,
            train_text_encoder_lora=s.train_text_encoder_lora,
        ),
        step=info.step,
        create_time=_timestamp(info.create_time),
        model=info.model,
        reason=info.reason,
        usage=common_pb2.Usage(gpu_seconds=info.gpu_seconds, total_time=_duration(info.total_s)),
    )
    if info.end_time is not None:
        job.end_time.CopyFrom(_timestamp(info.end_time))
    return job


def list_training_jobs_response(
    jobs: list[TrainingJobInfo], next_page_token: str
) -> diffusion_pb2.ListTrainingJobsResponse:
    """A page of jobs."""
    return diffusion_pb2.ListTrainingJobsResponse(
        jobs=[training_job(j) for j in jobs], next_page_token=next_page_token
    )


def watch_response(event: JobEvent) -> diffusion_pb2.WatchTrainingJobResponse:
    """One message of a WatchTrainingJob stream."""
    out = diffusion_pb2.WatchTrainingJobResponse(
        time=_timestamp(event.time), state=_STATES[event.state]
    )
    p = event.payload
    if isinstance(p, JobQueued):
        out.queued.position = p.position
    elif isinstance(p, ClassImagesProgress):
        out.class_images.done, out.class_images.total = p.done, p.total
    elif isinstance(p, TrainingStep):
        out.training_step.CopyFrom(
            diffusion_pb2.TrainingStep(
                step=p.step,
                total_steps=p.total_steps,
                loss=p.loss,
                learning_rate=p.learning_rate,
                eta=_duration(p.eta_s),
            )
        )
    elif isinstance(p, CheckpointSaved):
        out.checkpoint_saved.step = p.step
    elif isinstance(p, ValidationImage):
        out.validation_image.step = p.step
        out.validation_image.image.CopyFrom(common_pb2.Image(data=p.png, mime_type="image/png"))
    elif isinstance(p, JobSucceeded):
        out.succeeded.model = p.model
    elif isinstance(p, JobFailed):
        out.failed.reason = p.reason
    elif isinstance(p, JobCancelled):
        out.cancelled.SetInParent()
    return out
