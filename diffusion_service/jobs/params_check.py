"""The checks on a new job that need its base model, and its resolved parameters."""

from __future__ import annotations

import re

from diffusion_service.config import TrainingLimits
from diffusion_service.domain import TrainingInput, TuneKind
from diffusion_service.dreambooth.params import Defaults, JobParams
from diffusion_service.jobs.artifacts import FINE_TUNED_NAME
from diffusion_service.jobs.store import JobStore
from diffusion_service.registry import ModelRegistry, count_tokens
from dreamsight_server.errors import FailedPrecondition, InvalidArgument


def resolve_params(
    request: TrainingInput,
    tenant: str,
    job_id: str,
    registry: ModelRegistry,
    store: JobStore,
    defaults: Defaults,
    limits: TrainingLimits,
) -> tuple[JobParams, str]:
    """A new job's parameters and model name, checked against its base model.

    Raises NotFound for a base model the tenant cannot use, InvalidArgument
    naming the field, and FailedPrecondition for a model name already taken
    in the tenant's namespace (by a model or by an active job).
    """
    entry = registry.resolve(request.base_model, tenant)
    for name, text in (
        ("instance_prompt", request.instance_prompt),
        ("class_prompt", request.class_prompt),
        ("validation_prompt", request.validation_prompt),
    ):
        if text:
            tokens = count_tokens(entry, text)
            if tokens > entry.description.max_tokens:
                raise InvalidArgument(
                    f"spec.{name}",
                    f"{tokens} tokens, over the model's limit of "
                    f"{entry.description.max_tokens} (start and end tokens included)",
                )
    d = defaults
    resolution = request.resolution or d.resolution or entry.info.default_width
    if not limits.min_resolution <= resolution <= limits.max_resolution or resolution % 8:
        raise InvalidArgument(
            "spec.resolution",
            f"{resolution} (the model's default) is not a multiple of 8 from "
            f"{limits.min_resolution} to {limits.max_resolution}; set one",
        )
    name = request.output_model_name or default_name(entry.info.name, job_id)
    if not FINE_TUNED_NAME.fullmatch(name):
        raise InvalidArgument(
            "spec.output_model_name",
            f"{name!r} must be 1 to 100 letters, digits or ._- starting with a letter or digit",
        )
    # Names are per tenant: only a base model, the tenant's own models and
    # its own active jobs take one (another tenant's never shows here).
    if registry.get(name, tenant) is not None or store.name_reserved(name, tenant):
        raise FailedPrecondition(
            f"spec.output_model_name: a model named {name!r} exists or another job will create "
            "it; choose another name"
        )
    steps = request.max_train_steps or d.max_train_steps
    lora = request.kind is TuneKind.LORA
    rank = (request.rank or d.lora.rank) if lora else 0
    default_rate = d.lora.learning_rate if lora else d.learning_rate
    params = JobParams(
        base_model=entry.info.name,
        instance_prompt=request.instance_prompt,
        class_prompt=request.class_prompt,
        validation_prompt=request.validation_prompt,
        num_class_images=request.num_class_images,
        prior_loss_weight=request.prior_loss_weight or d.prior_loss_weight,
        max_train_steps=steps,
        learning_rate=request.learning_rate or default_rate,
        train_text_encoder=request.train_text_encoder,
        resolution=resolution,
        seed=request.seed,
        checkpoint_interval=request.checkpoint_interval or d.checkpoint_interval,
        num_instance_images=len(request.instance_images),
        kind=request.kind.value,
        rank=rank,
        lora_alpha=(request.lora_alpha or float(rank)) if lora else 0.0,
        lora_layers=(request.lora_layers or d.lora.lora_layers) if lora else (),
        train_text_encoder_lora=lora and request.train_text_encoder_lora,
        trainer=d.trainer,
        class_images=d.class_images,
        validation=d.validation,
    )
    return params, name


def default_name(base_model: str, job_id: str) -> str:
    """The model name of a job that asked for none."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base_model).strip("-.") or "model"
    return f"{base[:60]}-{job_id[:10]}"
