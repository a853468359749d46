"""diffusers on our terms: loading under an LRU bound, and one generation.

Everything that touches torch or diffusers lives here and runs in worker
threads. A loaded ``StableDiffusionPipeline`` is shared by every request for
its model, but a pipeline object also carries per-call state (guidance scale,
the interrupt flag, and above all its scheduler, which ``set_timesteps`` and
``step`` mutate). So each generation builds a fresh pipeline object around
the shared components and a fresh scheduler from the model's scheduler
config: concurrent requests never share mutable state, and the shared
pipeline's scheduler is never touched. Tokenizing and text encoding run
under a per-model lock (fast tokenizers are not safe to call from two
threads at once); the UNet and VAE run unlocked.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffusion_service.adapters import AdapterSlots
from diffusion_service.domain import Scheduler

log = logging.getLogger(__name__)

# Scheduler class and the settings that make it the sampler callers expect by
# that name (dpmpp_2m is DPM-Solver++ of order 2).
_SCHEDULERS: dict[Scheduler, tuple[str, dict[str, Any]]] = {
    Scheduler.DDIM: ("DDIMScheduler", {}),
    Scheduler.EULER: ("EulerDiscreteScheduler", {}),
    Scheduler.EULER_ANCESTRAL: ("EulerAncestralDiscreteScheduler", {}),
    Scheduler.DPMPP_2M: (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    Scheduler.PNDM: ("PNDMScheduler", {}),
}


def resolve_device(setting: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def resolve_dtype(setting: str, device: str) -> Any:
    """``auto`` is float16 on CUDA and float32 elsewhere."""
    import torch

    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    dtype = getattr(torch, setting, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {setting!r}")
    return dtype


@dataclass
class LoadedModel:
    """A loaded pipeline and what requests share around it."""

    name: str
    pipeline: Any
    adapters: AdapterSlots
    """The LoRA adapters on this pipeline; every generation runs through its gate."""
    text_lock: threading.Lock = field(default_factory=threading.Lock)
    _prototypes: dict[Scheduler | None, Any] = field(default_factory=dict)
    _proto_lock: threading.Lock = field(default_factory=threading.Lock)

    def new_scheduler(self, name: Scheduler | None) -> Any:
        """A fresh scheduler for one request (None: the model's own kind)."""
        with self._proto_lock:
            proto = self._prototypes.get(name)
            if proto is None:
                proto = self._prototypes[name] = _prototype(self.pipeline.scheduler, name)
        # From the prototype's own config: no foreign keys, no warnings.
        return type(proto).from_config(proto.config)


def _prototype(base: Any, name: Scheduler | None) -> Any:
    import diffusers

    if name is None:
        return type(base).from_config(base.config)
    class_name, overrides = _SCHEDULERS[name]
    extra = dict(overrides)
    if name is Scheduler.DDIM and "clip_sample" not in base.config:
        # Stable Diffusion samples are not clipped; DDIM's default is for pixels.
        extra["clip_sample"] = False
    return getattr(diffusers, class_name).from_config(base.config, **extra)


def load_pipeline(source: str, device: str, dtype: Any) -> Any:
    """Load a Stable Diffusion pipeline onto a device."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(source, dtype=dtype)
    if device != "cpu":
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_full_tune(
    base_source: str,
    tune_dir: str,
    parts: tuple[str, ...],
    overrides: dict[str, Any],
    device: str,
    dtype: Any,
) -> Any:
    """A full tune's pipeline: its changed parts over its base model's others."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    changed: dict[str, Any] = {}
    if "unet" in parts:
        changed["unet"] = UNet2DConditionModel.from_pretrained(
            tune_dir, subfolder="unet", dtype=dtype
        )
    if "text_encoder" in parts:
        changed["text_encoder"] = CLIPTextModel.from_pretrained(
            tune_dir, subfolder="text_encoder", dtype=dtype
        )
    pipe = StableDiffusionPipeline.from_pretrained(base_source, dtype=dtype, **changed)
    if overrides:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)
    if device != "cpu":
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PipelineCache:
    """Loaded pipelines, at most ``capacity``, least recently used evicted.

    Keyed by name and source together: two tenants' fine-tuned models may
    share a name (names are per tenant), never a loaded pipeline.

    An evicted pipeline stays alive while requests still run on it (they
    hold a reference) and is freed when they finish; the next request for
    it loads it again. Two requests for a model that is not loaded wait for
    one load.
    """

    def __init__(
        self, capacity: int, on_change: Callable[[int], None] = lambda loaded: None
    ) -> None:
        self._capacity = capacity
        self._on_change = on_change
        self._lock = threading.Lock()
        self._loaded: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._loading: dict[tuple[str, str], threading.Lock] = {}

    def get(self, name: str, source: str, load: Callable[[], LoadedModel]) -> LoadedModel:
        """The loaded model, loading it with ``load`` (and evicting another) if needed."""
        key = (name, source)
        with self._lock:
            hit = self._loaded.get(key)
            if hit is not None:
                self._loaded.move_to_end(key)
                return hit
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                hit = self._loaded.get(key)
                if hit is not None:
                    self._loaded.move_to_end(key)
                    return hit
            model = load()
            with self._lock:
                self._loaded[key] = model
                while len(self._loaded) > self._capacity:
                    (evicted, _), _ = self._loaded.popitem(last=False)
                    log.info("evicted model %s (keeping %d loaded)", evicted, self._capacity)
                self._loading.pop(key, None)
                count = len(self._loaded)
        self._on_change(count)
        return model

    def evict(self, name: str) -> None:
        """Drop the models of that name (running requests finish on them first)."""
        with self._lock:
            for key in [k for k in self._loaded if k[0] == name]:
                del self._loaded[key]
            count = len(self._loaded)
        self._on_change(count)

    def models(self) -> list[LoadedModel]:
        """The loaded models, least recently used first."""
        with self._lock:
            return list(self._loaded.values())

    def loaded(self) -> list[str]:
        """Loaded models' names, least recently used first."""
        with self._lock:
            return [name for name, _ in self._loaded]

    def clear(self) -> None:
        """Drop every model."""
        with self._lock:
            self._loaded.clear()
        self._on_change(0)


@dataclass(frozen=True)
class RenderParams:
    """One generation, fully resolved."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: Scheduler | None
    seeds: tuple[int, ...]


def render(
    model: LoadedModel, params: RenderParams, on_evaluation: Callable[[bool], None]
) -> list[bytes]:
    """Generate the images of one request as PNG bytes, in seed order.

    ``on_evaluation(counts_as_step)`` runs after every UNet evaluation; it
    is told whether that evaluation completes one of the ``steps`` the
    caller asked for (PNDM evaluates once more than it has steps; the rule
    is diffusers' own progress-bar rule). It may raise to stop the loop at
    once: the exception propagates out of this function and nothing more is
    computed, not even the VAE decode.
    """
    import torch

    base = model.pipeline
    pipe = type(base)(
        **{**base.components, "scheduler": model.new_scheduler(params.scheduler)},
        requires_safety_checker=bool(base.config.get("requires_safety_checker", False)),
    )
    pipe.set_progress_bar_config(disable=True)
    device = base._execution_device
    # diffusers' own rule: guidance <= 1 (or a guidance-distilled UNet) skips
    # the unconditional half; otherwise both halves go through one batched pass.
    guided = params.guidance_scale > 1 and base.unet.config.time_cond_proj_dim is None
    with model.text_lock:
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            params.prompt,
            device,
            1,
            guided,
            params.negative_prompt or None,
        )
    # CPU generators make a seed mean the same image on every device.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in params.seeds]

    def step_end(p: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        warmup = p.num_timesteps - params.steps * p.scheduler.order
        counts = i == p.num_timesteps - 1 or (i + 1 > warmup and (i + 1) % p.scheduler.order == 0)
        on_evaluation(counts)
        return tensors

    output = pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        height=params.height,
        width=params.width,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        num_images_per_prompt=len(params.seeds),
        generator=generators,
        callback_on_step_end=step_end,
        output_type="pil",
    )
    return [_png(image) for image in output.images]


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
