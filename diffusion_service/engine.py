"""The image engine interface and its diffusers implementation.

The servicer talks only to :class:`ImageEngine`. :class:`DiffusersEngine`
resolves the model (with tenancy checks), finishes validation that needs the
model, admits the request into a bounded queue, runs the pipeline in one of
``concurrency`` worker threads, streams a progress event per step, and meters
GPU-seconds while the request computes.

Prompts longer than the model's tokenizer limit (77 tokens for Stable
Diffusion's CLIP, start and end tokens included) are rejected with
INVALID_ARGUMENT naming ``prompt`` or ``negative_prompt``. diffusers would
silently cut them, drawing something other than what was asked for; a
caller who wants the cut can make it.

Cancellation: when the caller cancels, its deadline passes or it stops
reading, the stream's generator is closed, which flags the generation; the worker
checks the flag after every UNet evaluation and raises out of the diffusers
loop, so at most the step already running finishes and the worker takes the
next request at once. A request still waiting for a worker just leaves the
queue.

Reproducibility: image i uses a CPU generator seeded with seed + i, so the
same seed and parameters (num_images included: a batch is computed as one
tensor) give the same PNG bytes on the same machine and settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from diffusion_service.adapters import AdapterGone, AdapterRef, AdapterSlots
from diffusion_service.config import DiffusionSettings
from diffusion_service.domain import (
    GenerateDone,
    GenerateEvent,
    GenerateInput,
    Image,
    ModelInfo,
    Progress,
)
from diffusion_service.metrics import DiffusionMetrics
from diffusion_service.pipelines import (
    LoadedModel,
    PipelineCache,
    RenderParams,
    load_full_tune,
    load_pipeline,
    render,
    resolve_device,
    resolve_dtype,
)
from diffusion_service.registry import ModelEntry, ModelRegistry, count_tokens
from dreamsight_server import metering
from dreamsight_server.errors import (
    Cancelled,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from dreamsight_server.gpu_seconds import GpuSecondsMeter

log = logging.getLogger(__name__)

MAX_RANDOM_SEED = 2**32


class ImageEngine(Protocol):
    """What the diffusion servicer needs from an engine."""

    @property
    def ready(self) -> bool:
        """True once the default model is loaded."""
        ...

    def list_models(self, tenant: str) -> list[ModelInfo]:
        """Base models, then the tenant's fine-tuned models."""
        ...

    def delete_model(self, name: str, tenant: str) -> None:
        """Delete one of the tenant's fine-tuned models."""
        ...

    def generate(self, request: GenerateInput, tenant: str) -> AsyncGenerator[GenerateEvent, None]:
        """Stream Progress per step, then one GenerateDone.

        Raises domain errors (NotFound, PermissionDenied, InvalidArgument,
        ResourceExhausted) before anything is queued. Closing the iterator
        stops the generation between steps.
        """
        ...


@dataclass(frozen=True)
class GenerationRecord:
    """How a finished generation ended; the last few are kept (``recent``) so
    that tests and a debugger can see how cancellation went."""

    generation_id: str
    outcome: str
    """``ok``, ``cancelled`` or ``error``."""
    steps_done: int
    evaluations: int
    evaluations_at_cancel: int | None
    """UNet evaluations done when the cancel arrived; None if never cancelled."""


class _Stopped(Exception):
    """Raised inside the diffusers loop to stop a cancelled generation."""


class _AllowanceSpent(Exception):
    """Raised inside the diffusers loop when a generation used up its allowance."""


class _Generation:
    """One admitted generation, shared by the event loop and its worker."""

    def __init__(
        self, request_id: str, entry: ModelEntry, params: RenderParams, arrival: float
    ) -> None:
        self.id = f"{request_id or 'generate'}-{uuid.uuid4().hex[:12]}"
        self.entry = entry
        self.params = params
        self.arrival = arrival
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Progress | None] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.evaluations = 0
        self.steps_done = 0
        self.evaluations_at_cancel: int | None = None
        self.last_mark = 0.0
        self.gpu_seconds = 0.0
        """What the worker spent on it, set when the worker lets go."""
        self.allowance = metering.allowance()
        """GPU-seconds it may spend (the gateway's share of the tenant's budget)."""

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.evaluations_at_cancel = self.evaluations
            self.cancelled.set()

    def emit(self, item: Progress | None) -> None:
        """Hand an event to the stream (called from the worker thread)."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class DiffusersEngine:
    """An :class:`ImageEngine` over diffusers pipelines in worker threads."""

    def __init__(
        self,
        settings: DiffusionSettings,
        metrics: DiffusionMetrics,
        registry: ModelRegistry | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self.registry = registry or ModelRegistry()
        self.meter = GpuSecondsMeter(devices=settings.devices_per_worker)
        self._cache = PipelineCache(settings.max_loaded_models, self._cache_changed)
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._executor: ThreadPoolExecutor | None = None
        self._device = "cpu"
        self._dtype: Any = None
        self._waiting = 0
        self._running = 0
        self._generations: set[_Generation] = set()
        self._ready = False
        self._typical_s = 5.0
        self.recent: deque[GenerationRecord] = deque(maxlen=32)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def queue_depth(self) -> int:
        """Generations waiting for a worker."""
        return self._waiting

    @property
    def running(self) -> int:
        """Generations on a worker now (including ones stopping after a cancel)."""
        return self._running

    def loaded_models(self) -> list[str]:
        """Models in memory, least recently used first."""
        return self._cache.loaded()

    async def start(self) -> None:
        """Read the base models and load the default one (off the event loop)."""
        await asyncio.to_thread(self._start)
        self._ready = True

    def _start(self) -> None:
        import torch

        s = self._settings
        torch.set_num_threads(s.torch_threads)
        self._device = resolve_device(s.device)
        self._dtype = resolve_dtype(s.dtype, self._device)
        self._executor = ThreadPoolExecutor(
            max_workers=s.concurrency,
            thread_name_prefix="diffusion-worker",
            initializer=torch.set_num_threads,
            initargs=(s.torch_threads,),
        )
        for model in s.models:
            self.registry.add_base(model)
        default = self.registry.resolve("", "")
        self._loaded_for(default)
        log.info("diffusion engine ready: %s on %s", default.info.name, self._device)

    def shutdown(self) -> None:
        """Stop running generations at their next step and release the workers."""
        self._ready = False
        for generation in list(self._generations):
            generation.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._cache.clear()

    def register_fine_tuned(
        self, name: str, path: str | Path, owner_tenant: str, base_model: str, training_job_id: str
    ) -> ModelInfo:
        """Serve a tenant's fine-tuned pipeline; see ModelRegistry.register_fine_tuned."""
        return self.registry.register_fine_tuned(
            name, path, owner_tenant, base_model, training_job_id
        )

    def list_models(self, tenant: str) -> list[ModelInfo]:
        self._check_ready()
        return self.registry.visible(tenant)

    def delete_model(self, name: str, tenant: str) -> None:
        self._check_ready()
        entry = self.registry.delete(name, tenant)
        if entry.adapter:
            # Waits for generations running on it; nothing runs on it afterwards.
            for model in self._cache.models():
                model.adapters.unload(entry.source)
        else:
            self._cache.evict(name)

    def loaded_adapters(self) -> list[str]:
        """Adapter directories loaded on any base pipeline."""
        return [source for m in self._cache.models() for source in m.adapters.loaded()]

    async def generate(
        self, request: GenerateInput, tenant: str
    ) -> AsyncGenerator[GenerateEvent, None]:
        arrival = time.monotonic()
        generation = self._prepare(request, tenant, arrival)
        limit = self._settings.concurrency + self._settings.max_queue
        if self._waiting + self._running >= limit:
            raise ResourceExhausted(
                f"{self._waiting} generations are waiting, the queue holds "
                f"{self._settings.max_queue}; retry later",
                retry_after_s=self._retry_after(),
            )
        self._waiting += 1
        self._metrics.queue_depth.set(self._waiting)
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            self._metrics.queue_depth.set(self._waiting)
        if self._executor is None:
            self._slots.release()
            raise Unavailable("the diffusion service is shutting down")
        self._running += 1
        self._metrics.running.set(self._running)
        self._generations.add(generation)
        future = generation.loop.run_in_executor(self._executor, self._work, generation)
        future.add_done_callback(lambda done: self._finished(generation, done))
        try:
            while (event := await generation.events.get()) is not None:
                yield event
            if future.cancelled():  # the executor shut down before the generation started
                raise Unavailable("the diffusion service is shutting down")
            pngs, gpu_seconds = await future
        except _Stopped:
            raise Cancelled("the generation was stopped (service shutting down)") from None
        except _AllowanceSpent:
            raise ResourceExhausted(
                f"the generation used up its GPU-second allowance ({generation.allowance:.3g} "
                f"s, its share of the tenant's remaining budget) after {generation.steps_done} "
                "steps; what it spent is billed"
            ) from None
        finally:
            if not future.done():
                # Stopped early: the step in flight ends first. Wait for it, so the
                # call's bill (and the tenant's slot at the gateway) covers it.
                generation.cancel()
                await asyncio.shield(asyncio.wait({future}))
            metering.report(generation.gpu_seconds)
        total_s = time.monotonic() - arrival
        self._metrics.images.inc(len(pngs))
        self._metrics.generation_seconds.observe(total_s)
        self._typical_s = 0.8 * self._typical_s + 0.2 * total_s
        images = zip(pngs, generation.params.seeds, strict=True)
        yield GenerateDone(
            images=tuple(Image(png, seed) for png, seed in images),
            gpu_seconds=gpu_seconds,
            total_s=total_s,
            model=generation.entry.info.name,
        )

    def _check_ready(self) -> None:
        if not self._ready:
            raise Unavailable("the diffusion service is loading its model; retry shortly")

    def _prepare(self, request: GenerateInput, tenant: str, arrival: float) -> _Generation:
        """The checks that need the model; nothing is queued or metered yet."""
        self._check_ready()
        entry = self.registry.resolve(request.model, tenant)
        prompts = (("prompt", request.prompt), ("negative_prompt", request.negative_prompt))
        for field, text in prompts:
            if not text:
                continue
            tokens = count_tokens(entry, text)
            if tokens > entry.description.max_tokens:
                raise InvalidArgument(
                    field,
                    f"{tokens} tokens, over the model's limit of {entry.description.max_tokens} "
                    "(start and end tokens included); shorten it",
                )
        limits = self._settings.limits
        steps = request.steps or limits.default_steps
        if steps > entry.description.max_steps:
            raise InvalidArgument(
                "steps",
                f"{steps} is over this model's limit of {entry.description.max_steps} "
                "(half its scheduler's training timesteps)",
            )
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_RANDOM_SEED)
        params = RenderParams(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width or entry.info.default_width,
            height=request.height or entry.info.default_height,
            steps=steps,
            guidance_scale=(
                limits.default_guidance_scale
                if request.guidance_scale is None
                else request.guidance_scale
            ),
            scheduler=request.scheduler,
            seeds=tuple(seed + i for i in range(request.num_images)),
        )
        return _Generation(request.request_id, entry, params, arrival)

    def _retry_after(self) -> float:
        per_worker = (self._waiting + self._running) / self._settings.concurrency
        return max(0.1, round(self._typical_s * per_worker / 2, 1))

    def _load(self, entry: ModelEntry) -> LoadedModel:
        started = time.monotonic()
        tune = entry.tune
        if tune is not None and not entry.adapter:
            pipeline = load_full_tune(
                entry.base_source, entry.source, tune.parts, tune.scheduler_overrides,
                self._device, self._dtype,
            )  # fmt: skip
        else:
            pipeline = load_pipeline(entry.source, self._device, self._dtype)
        self._metrics.model_loads.inc()
        name = entry.info.name
        log.info("loaded model %s in %.1fs", name, time.monotonic() - started)
        s = self._settings
        adapters = AdapterSlots(
            pipeline, s.max_loaded_adapters, s.max_adapter_cache_mb * 2**20,
            lambda how: self._metrics.adapter_loads.labels(how).inc(),
        )  # fmt: skip
        return LoadedModel(name=name, pipeline=pipeline, adapters=adapters)

    def _loaded_for(self, entry: ModelEntry) -> LoadedModel:
        """The pipeline an entry runs on: its own, or its base's for an adapter."""
        if entry.adapter:
            base = self.registry.get(entry.info.base_model, "")
            if base is None:
                raise NotFound(f"base model {entry.info.base_model!r} not found")
            entry = base
        target = entry
        return self._cache.get(entry.info.name, entry.source, lambda: self._load(target))

    def _cache_changed(self, loaded: int) -> None:
        self._metrics.models_loaded.set(loaded)

    def _work(self, generation: _Generation) -> tuple[list[bytes], float]:
        """Runs in a worker thread: load if needed, render, meter (a model load
        holds the worker too, so it is metered to the call that needed it)."""
        try:
            if generation.cancelled.is_set():
                raise _Stopped
            if not self.registry.contains(generation.entry):
                raise NotFound(f"model {generation.entry.info.name!r} was deleted")
            self.meter.start(generation.id)
            try:
                entry = generation.entry
                model = self._loaded_for(entry)
                adapter = AdapterRef(entry.source, entry.info.size_bytes) if entry.adapter else None
                with model.adapters.use(adapter, lambda: self.registry.contains(entry)):
                    if generation.cancelled.is_set():
                        raise _Stopped
                    generation.last_mark = time.monotonic()
                    pngs = render(
                        model, generation.params, lambda counts: self._evaluated(generation, counts)
                    )
            except AdapterGone:
                raise NotFound(f"model {generation.entry.info.name!r} was deleted") from None
            finally:
                gpu_seconds = generation.gpu_seconds = self.meter.finish(generation.id)
                self._metrics.gpu_seconds.inc(gpu_seconds)
            return pngs, gpu_seconds
        finally:
            generation.emit(None)

    def _evaluated(self, generation: _Generation, counts_as_step: bool) -> None:
        """After each UNet evaluation, in the worker: time it, stop or report."""
        now = time.monotonic()
        self._metrics.step_seconds.observe(now - generation.last_mark)
        generation.last_mark = now
        generation.evaluations += 1
        if generation.cancelled.is_set():
            raise _Stopped
        allowance = generation.allowance
        if allowance is not None and self.meter.spent(generation.id) >= allowance:
            raise _AllowanceSpent
        if counts_as_step:
            generation.steps_done += 1
            generation.emit(Progress(generation.steps_done, generation.params.steps))

    def _finished(self, generation: _Generation, future: Future[Any] | asyncio.Future[Any]) -> None:
        """On the event loop once the worker let go of the generation."""
        self._running -= 1
        self._metrics.running.set(self._running)
        self._generations.discard(generation)
        self._slots.release()
        if future.cancelled():
            generation.events.put_nowait(None)  # _work never ran to say it is done
        error = None if future.cancelled() else future.exception()
        if error is None and not future.cancelled():
            outcome = "ok"
        elif isinstance(error, _Stopped | _AllowanceSpent) or future.cancelled():
            outcome = "cancelled"
            log.info(
                "generation %s stopped after %d evaluations (cancelled after %s)",
                generation.id,
                generation.evaluations,
                generation.evaluations_at_cancel,
            )
        else:
            outcome = "error"
        self.recent.append(
            GenerationRecord(
                generation.id,
                outcome,
                generation.steps_done,
                generation.evaluations,
                generation.evaluations_at_cancel,
            )
        )
