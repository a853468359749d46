"""One DreamBooth job on Lightning: class images, data, fit, export.

:func:`run_job` is what a worker process runs. It reports through an
:class:`Events` sink (``class_images``, ``resumed``, ``step``,
``checkpoint``, ``validation``, ``exported``) and polls a :class:`Control`
between steps: a cancel stops after the step that is running; a shutdown
(the service stopping) also saves a checkpoint of that step first, so the
next start resumes where this one left off.

Checkpoints: ``ModelCheckpoint`` every ``checkpoint_interval`` optimizer
steps, the newest ``keep_checkpoints`` kept, ``last.ckpt`` linked to the
newest, each file written to a temporary name and renamed into place (a kill
mid-write never leaves a torn checkpoint). A job with a ``last.ckpt`` resumes
from it: global step, optimizer and LR schedule are restored by Lightning.
TensorBoard logs (loss curves and validation images) go to
``tensorboard/run`` under the job directory, the same run directory across
resumes; without the ``tensorboard`` package the curves go to CSV files in
the same place instead.

Devices: ``accelerator``, ``devices`` and ``strategy`` are handed to the
Trainer as they are (``ddp`` over several GPUs re-launches this worker once
per extra rank, Lightning's subprocess launcher); only rank 0 reports events,
draws class images, renders validation images and exports.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from diffusion_service.dreambooth.class_images import (
    ClassImageKey,
    StopRequested,
    ensure_class_images,
)
from diffusion_service.dreambooth.data import DreamBoothDataset, ImageSet, collate, load_image_dir
from diffusion_service.dreambooth.module import DreamBoothModule
from diffusion_service.dreambooth.params import JobParams, WorkerRuntime, WorkerSpec
from diffusion_service.jobs.worker_events import (
    CheckpointWritten,
    ClassImagesDrawn,
    Exported,
    StepFinished,
    TrainingBegan,
    ValidationRendered,
    WorkerEvent,
)
from diffusion_service.tunes import TuneManifest

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
TENSORBOARD = "tensorboard"
RUN_VERSION = "run"
VALIDATION = "validation"


class Events(Protocol):
    """Where a job reports progress (rank 0 only)."""

    def emit(self, event: WorkerEvent) -> None:
        """Report one event."""
        ...


class Control(Protocol):
    """Stop requests from the service, polled between steps."""

    @property
    def cancelled(self) -> bool:
        """The owner cancelled the job: stop, nothing to keep."""
        ...

    @property
    def shutting_down(self) -> bool:
        """The service is stopping: save a checkpoint, stop, resume later."""
        ...


# Lightning is untyped to mypy here (see pyproject): its classes are Any.
class AtomicCheckpointIO(TorchCheckpointIO):  # type: ignore[misc]
    """Writes each checkpoint beside its target and renames it into place."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        tmp = f"{path}.tmp"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        # Replaces a last.ckpt link itself, never the file it points to.
        os.replace(tmp, path)


def resume_checkpoint(job_dir: Path) -> Path | None:
    """The checkpoint to resume from: last.ckpt, else the newest step file."""
    directory = job_dir / CHECKPOINTS
    last = directory / LAST
    if last.is_file():  # follows the link; a dangling link is not a file
        return last
    steps = sorted(directory.glob("step-*.ckpt")) if directory.is_dir() else []
    return steps[-1] if steps else None


class JobCheckpoint(ModelCheckpoint):  # type: ignore[misc]
    """ModelCheckpoint that reports saves and obeys stop requests.

    Lightning runs checkpoint callbacks after all others, so a step's
    ``step`` event and validation images are out before its checkpoint.
    """

    def __init__(self, events: Events | None, control: Control, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._events = events
        self._control = control
        self._reported = -1

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        step = trainer.global_step
        if self._events is not None and trainer.is_global_zero and step > self._reported:
            self._reported = step
            self._events.emit(CheckpointWritten(step))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, i)
        # Every rank must agree, or DDP would wait on a rank that left.
        stop = trainer.strategy.reduce_boolean_decision(
            self._control.cancelled or self._control.shutting_down, all=False
        )
        if not stop:
            return
        if not self._control.cancelled and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        trainer.should_stop = True


class JobProgress(Callback):  # type: ignore[misc]
    """Reports each optimizer step, renders validation images, logs them."""

    def __init__(
        self,
        events: Events | None,
        params: JobParams,
        render: Callable[[DreamBoothModule], list[Any]] | None,
        job_dir: Path,
    ) -> None:
        self._events = events
        self._params = params
        self._render = render
        self._job_dir = job_dir
        self._seen_step = -1
        self._last_end = 0.0
        self._step_s: float | None = None
        self._losses: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step
        self._last_end = time.monotonic()
        if self._events is not None and trainer.is_global_zero:
            self._events.emit(TrainingBegan(self._seen_step))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(float(loss.detach()))
        step = trainer.global_step
        if step == self._seen_step:  # accumulating: no optimizer step yet
            return
        self._seen_step = step
        now = time.monotonic()
        took = now - self._last_end
        self._last_end = now
        self._step_s = took if self._step_s is None else 0.8 * self._step_s + 0.2 * took
        mean_loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        self._losses.clear()
        total = self._params.max_train_steps
        if self._events is not None and trainer.is_global_zero:
            lr = trainer.callback_metrics.get("train/lr")
            self._events.emit(
                StepFinished(
                    step=step,
                    total=total,
                    loss=mean_loss if math.isfinite(mean_loss) else None,
                    lr=float(lr) if lr is not None else None,
                    eta_s=self._step_s * (total - step),
                )
            )
        due = step % self._params.checkpoint_interval == 0 or step >= total
        if self._render is not None and due and trainer.is_global_zero:
            assert isinstance(pl_module, DreamBoothModule)
            self._validate(trainer, pl_module, step)
            self._last_end = time.monotonic()  # rendering is not a training step

    def _validate(self, trainer: pl.Trainer, module: DreamBoothModule, step: int) -> None:
        assert self._render is not None
        images = self._render(module)
        out = self._job_dir / VALIDATION
        out.mkdir(exist_ok=True)
        logger = trainer.logger
        for index, image in enumerate(images):
            path = out / f"step-{step:06d}-{index}.png"
            image.save(path, format="PNG")
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    f"validation/{index}", np.asarray(image), step, dataformats="HWC"
                )
            if self._events is not None:
                self._events.emit(ValidationRendered(step, str(path.relative_to(self._job_dir))))


def resolve_device(accelerator: str) -> str:
    """Where class images are drawn and latents cached (rank 0)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def resolve_precision(setting: str, device: str) -> str:
    """Lightning's precision for a YAML ``mixed_precision`` value."""
    if setting == "no" or (setting == "auto" and device != "cuda"):
        return "32-true"
    if setting == "fp16":
        return "16-mixed"
    if setting == "bf16":
        return "bf16-mixed"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


class Components:
    """The base model's parts, loaded once per worker."""

    def __init__(self, source: str) -> None:
        import diffusers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.source = source
        self.tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        # Training adds noise with DDPM's schedule (the script's choice); the
        # model's own sampler draws class and validation images.
        self.noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        index: Any = diffusers.StableDiffusionPipeline.load_config(source)
        sampler_class = getattr(diffusers, index["scheduler"][1])
        self.sampler_config = sampler_class.load_config(source, subfolder="scheduler")
        self._sampler_class = sampler_class

    def prompt_ids(self, instance_prompt: str, class_prompt: str) -> torch.Tensor:
        """Token ids of the instance prompt (row 0) and the class prompt (row 1)."""
        ids: torch.Tensor = self.tokenizer(
            [instance_prompt, class_prompt],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids

    def pipeline(self, unet: Any = None, text_encoder: Any = None) -> Any:
        """An inference pipeline around the given (or the base) UNet and text encoder."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=text_encoder if text_encoder is not None else self.text_encoder,
            tokenizer=self.tokenizer,
            unet=unet if unet is not None else self.unet,
            scheduler=self._sampler_class.from_config(self.sampler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _quiet_lightning() -> None:
    # Expected here, and noise in a job's log: mid-epoch resumes (DreamBooth
    # cycles a handful of images, the order does not matter), a data loader
    # in the main process (the data is a few cached tensors), a resumed
    # job's checkpoint directory, small epochs, and the frozen VAE being in
    # eval mode.
    for pattern in (
        ".*resuming from a checkpoint that ended before the epoch ended.*",
        ".*does not have many workers.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*smaller than the logging interval.*",
        ".*module\\(s\\) in eval mode at the start of training.*",
        ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def job_logger(job_dir: Path) -> Logger:
    """TensorBoard in ``tensorboard/run`` (CSV files there if it is not installed)."""
    import importlib.util

    if any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        return TensorBoardLogger(
            save_dir=str(job_dir), name=TENSORBOARD, version=RUN_VERSION, default_hp_metric=False
        )
    log.warning("tensorboard is not installed; writing loss curves as CSV")
    return CSVLogger(save_dir=str(job_dir), name=TENSORBOARD, version=RUN_VERSION)


def run_job(spec: WorkerSpec, job_dir: Path, events: Events | None, control: Control) -> str:
    """Train one job to its end; returns ``exported``, ``cancelled`` or ``stopped``.

    ``events`` is None on ranks other than 0. Raises StopRequested when a
    stop arrives while class images are drawn.
    """
    _quiet_lightning()
    params, runtime = spec.params, spec.runtime
    pl.seed_everything(params.seed, workers=True, verbose=False)
    device = resolve_device(runtime.accelerator)
    parts = Components(runtime.base_source)
    classes = None
    if params.with_prior:
        classes = _class_images(params, runtime, parts, device, events, control)
    if control.cancelled or control.shutting_down:
        raise StopRequested
    instances = ImageSet(
        load_image_dir(Path(runtime.instance_dir), params.resolution), params.trainer.random_flip
    )
    if params.trainer.cache_latents:
        parts.vae.to(device)
        instances.encode(parts.vae)
        if classes is not None:
            classes.encode(parts.vae)
        parts.vae.to("cpu")
    module = DreamBoothModule(
        parts.unet,
        parts.text_encoder,
        parts.vae,
        parts.noise_scheduler,
        parts.prompt_ids(params.instance_prompt, params.class_prompt),
        params,
    )
    loader: torch.utils.data.DataLoader[dict[str, Any]] = torch.utils.data.DataLoader(
        DreamBoothDataset(instances, classes),  # type: ignore[arg-type]
        batch_size=params.trainer.train_batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=0,
    )
    trainer = build_trainer(params, runtime, job_dir, events, control, parts, device)
    resume = resume_checkpoint(job_dir)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(resume) if resume else None)
    if control.cancelled:
        return "cancelled"
    if trainer.global_step < params.max_train_steps:
        return "stopped"
    if trainer.is_global_zero:
        export(parts, module, Path(runtime.export_dir), runtime.job_id)
        if events is not None:
            events.emit(Exported(trainer.global_step))
    return "exported"


def _class_images(
    params: JobParams,
    runtime: WorkerRuntime,
    parts: Components,
    device: str,
    events: Events | None,
    control: Control,
) -> ImageSet:
    key = ClassImageKey(
        base_model=params.base_model,
        base_source=runtime.base_source,
        prompt=params.class_prompt,
        resolution=params.resolution,
        count=params.num_class_images,
    )

    def load() -> Any:
        pipe = parts.pipeline()
        return pipe.to(device) if device != "cpu" else pipe

    def progress(done: int, total: int) -> None:
        if events is not None:
            events.emit(ClassImagesDrawn(done, total))

    options = params.class_images
    directory = ensure_class_images(
        key,
        Path(runtime.class_cache_dir),
        params.seed,
        load,
        options.batch_size,
        options.inference_steps,
        options.guidance_scale,
        progress,
        lambda: control.cancelled or control.shutting_down,
    )
    for part in (parts.unet, parts.text_encoder, parts.vae):
        part.to("cpu")
    pixels = load_image_dir(directory, params.resolution, "*.png")
    return ImageSet(pixels, params.trainer.random_flip)


def build_trainer(
    params: JobParams,
    runtime: WorkerRuntime,
    job_dir: Path,
    events: Events | None,
    control: Control,
    parts: Components,
    device: str,
) -> pl.Trainer:
    """The Lightning Trainer of one job, with its checkpoints and logger."""
    render = None
    if params.validation_prompt:
        validation = params.validation

        def render(module: DreamBoothModule) -> list[Any]:
            generators = [
                torch.Generator("cpu").manual_seed(params.seed + i)
                for i in range(validation.num_images)
            ]
            module.eval()
            try:
                with torch.no_grad():
                    pipe = parts.pipeline(module.unet, module.text_encoder)
                    images: list[Any] = pipe(
                        params.validation_prompt,
                        height=params.resolution,
                        width=params.resolution,
                        num_inference_steps=validation.inference_steps,
                        guidance_scale=validation.guidance_scale,
                        num_images_per_prompt=validation.num_images,
                        generator=generators,
                    ).images
            finally:
                module.train()
            return images

    checkpoint = JobCheckpoint(
        events,
        control,
        dirpath=job_dir / CHECKPOINTS,
        filename="step-{step:06d}",
        auto_insert_metric_name=False,
        monitor="step",
        mode="max",
        save_top_k=params.trainer.keep_checkpoints,
        save_last="link",
        every_n_train_steps=params.checkpoint_interval,
    )
    t = params.trainer
    return pl.Trainer(
        accelerator=runtime.accelerator,
        devices=runtime.devices,
        strategy=runtime.strategy,
        precision=resolve_precision(t.mixed_precision, device),
        max_steps=params.max_train_steps,
        max_epochs=-1,
        accumulate_grad_batches=t.gradient_accumulation_steps,
        gradient_clip_val=t.max_grad_norm or None,
        logger=job_logger(job_dir),
        callbacks=[JobProgress(events, params, render, job_dir), checkpoint],
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(job_dir),
    )


def export(parts: Components, module: DreamBoothModule, out: Path, job_id: str) -> None:
    """Write what the job changed: the adapters in diffusers' LoRA format, or
    a full tune's UNet (and text encoder), with the manifest (see tunes)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    module.cpu()
    params = module.params
    manifest = TuneManifest(kind=params.kind, base_model=params.base_model, job_id=job_id)
    if params.lora:
        _export_lora(module, out)
        manifest = dataclasses.replace(
            manifest,
            rank=params.rank,
            lora_alpha=params.lora_alpha,
            lora_layers=params.lora_layers,
            text_encoder_lora=params.train_text_encoder_lora,
        )
    else:
        module.unet.save_pretrained(out / "unet", safe_serialization=True)
        parts_saved: tuple[str, ...] = ("unet",)
        if params.train_text_encoder:
            module.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
            parts_saved += ("text_encoder",)
        # Trained on the simplified objective, so a learned variance is ignored
        # (as the diffusers script does).
        overrides = {}
        if parts.sampler_config.get("variance_type") in ("learned", "learned_range"):
            overrides["variance_type"] = "fixed_small"
        manifest = dataclasses.replace(manifest, parts=parts_saved, scheduler_overrides=overrides)
    manifest.write(out)


def _export_lora(module: DreamBoothModule, out: Path) -> None:
    """diffusers' own LoRA export, as its train_dreambooth_lora.py does it, but
    with the UNet's adapters under peft's names: ``convert_state_dict_to_diffusers``
    renames only the attention projections (to ``lora.down``/``lora.up``), and
    ``load_lora_weights`` takes a UNet file's format from its first key, so a
    file with adapters on convolutions too lost its attention adapters on load."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet, encoder = module.unet, module.text_encoder
    text_layers = text_metadata = None
    if module.params.train_text_encoder_lora:
        text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
        text_metadata = encoder.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_metadata,
        safe_serialization=True,
    )
