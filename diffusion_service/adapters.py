"""LoRA adapters on one loaded base pipeline: a bounded cache and a gate.

A tenant's LoRA model runs on its base model's loaded pipeline: its adapter
is loaded into that pipeline's UNet (and text encoder) on first use with
diffusers' ``load_lora_weights`` and kept, least recently used unloaded
first, while the adapters of that base stay within a count and a byte
budget (``--max-loaded-adapters``, ``--max-adapter-cache-mb``).

Which adapter is active is state of the shared modules, so the pipeline
runs one adapter at a time. :meth:`AdapterSlots.use` is the gate:
generations for the adapter (or the base alone) that is active now run
together, as concurrently as the worker threads allow; one for another
adapter waits until they finish, then switches (``set_adapters``, or
``disable_lora`` for the base). Arrivals queue in order, and a generation
does not join a running group while one for another adapter waits ahead of
it, so a switch is never starved. Every switch sets the whole state
explicitly, so no adapter is ever active in another tenant's image; with
adapters disabled, peft's layers call the base layer alone, so base images
stay byte-identical to those of a pipeline that never saw an adapter.

When the cache is full, the adapter that comes in takes the place of the
least recently used one by hot-swapping its weights into that adapter's
layers (diffusers' ``load_lora_weights(..., hotswap=True)``, peft's
``hotswap_adapter_from_state_dict``): a copy of tensors, without injecting
new layers into the UNet, about a fifth of a fresh load's time on the demo
model (docs/benchmarks.md), so that many tenants rotating over one base cost
little more than a few. A swap is made only where it is exact: the incoming
file's tensors have the shapes of the slot's on some of its modules (the
same rank; as every job with the service's LoRA defaults has), the slot's
other modules are zeroed and the scaling is set per module, so nothing of
the outgoing adapter stays and the image is the one a fresh load gives, byte
for byte. Otherwise the outgoing adapter is deleted and the incoming one
loaded afresh: other modules or another rank, adapters on the text encoder
(diffusers does not hot-swap those), or a pair peft refuses (another kind
of LoRA). Slots have names of their own (a fixed-width counter): peft finds
an adapter's tensors by its name as a substring of theirs, which two names
of one width never are of each other.

Batching several adapters in one UNet pass is what peft's mixed-adapter
inference would allow, but diffusers' Stable Diffusion pipeline takes no
per-image adapter names; serialising per base costs nothing at the default
one generation at a time (see docs/benchmarks.md for the rotating-tenant
measurement).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_service.tunes import LORA_WEIGHTS

log = logging.getLogger(__name__)


class AdapterGone(LookupError):
    """The adapter's model was deleted while its generation waited."""


@dataclass(frozen=True)
class AdapterRef:
    """One tenant's LoRA model, as the base pipeline loads it."""

    source: str
    """The adapter directory (one per job, so unique across tenants)."""
    size_bytes: int

    @property
    def key(self) -> str:
        """The adapter's name inside the pipeline (a peft module key: no dots)."""
        return "a" + hashlib.sha256(self.source.encode()).hexdigest()[:20]


def swappable_shapes(source: str) -> dict[str, tuple[int, ...]] | None:
    """An adapter file's tensor shapes by name (read from its header only), or
    None where it may not be hot-swapped: its weights reach the text encoder,
    or the file cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(source) / LORA_WEIGHTS), "pt") as weights:
            shapes = {
                name: tuple(weights.get_slice(name).get_shape())
                for name in weights.keys()  # noqa: SIM118 (safe_open has no __iter__)
            }
    except Exception:
        return None
    if any(name.startswith("text_encoder") for name in shapes):
        return None
    return shapes


@dataclass(frozen=True)
class _Slot:
    """A loaded adapter: its name in the pipeline, and its file's tensor shapes
    (None: never hot-swapped into or out of; see :func:`swappable_shapes`)."""

    ref: AdapterRef
    name: str
    shapes: dict[str, tuple[int, ...]] | None


def _fits(incoming: dict[str, tuple[int, ...]] | None, slot: _Slot) -> bool:
    """Whether a hot swap of ``incoming`` into ``slot`` is exact: the same
    tensors' shapes on some of its modules (the rest are zeroed), so that the
    swap only copies and every image is the one a fresh load would give."""
    if incoming is None or slot.shapes is None:
        return False
    return all(slot.shapes.get(name) == shape for name, shape in incoming.items())


def _keep_swapped_scaling(unet: Any, name: str) -> None:
    """Make the scaling a hot swap set (the incoming adapter's alpha over its
    rank, per module) the one that ``set_adapters`` computes from then on.

    peft's hot swap sets each layer's ``scaling`` but leaves its ``lora_alpha``
    and ``r`` those of the outgoing adapter, and diffusers' ``set_adapters``
    recomputes ``scaling`` as ``weight * lora_alpha / r``: the incoming weights
    would run at the outgoing adapter's scale. With ``r`` 1 and ``lora_alpha``
    the swapped scaling, that computation gives back exactly what the swap set
    (``r`` is not used in the forward pass; the tensors keep their shapes)."""
    from peft.tuners.lora import LoraLayer

    for module in unet.modules():
        if isinstance(module, LoraLayer) and name in module.scaling:
            module.r[name] = 1
            module.lora_alpha[name] = float(module.scaling[name])


class AdapterSlots:
    """The adapters loaded into one base pipeline, and which one runs."""

    def __init__(
        self,
        pipeline: Any,
        max_count: int,
        max_bytes: int,
        on_load: Callable[[str], None] = lambda how: None,
        hotswap: bool = True,
    ) -> None:
        """``on_load`` hears each load, ``hot_swap`` or ``fresh``; ``hotswap``
        False always deletes and loads afresh (a benchmark's other side)."""
        self._pipeline = pipeline
        self._hotswap = hotswap
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._on_load = on_load
        self._cond = threading.Condition()
        self._loaded: OrderedDict[str, _Slot] = OrderedDict()
        """By AdapterRef.key, least recently used first."""
        self._names = (f"slot{n:08d}" for n in itertools.count())
        self._active: str | None = ""
        """The active adapter's key; "" the base alone; None not known (set it)."""
        self._running = 0
        self._queue: list[tuple[object, str | None]] = []
        """Waiting (ticket, key) in arrival order; key None is an unload."""
        self.switches = 0

    @contextmanager
    def use(
        self, adapter: AdapterRef | None, alive: Callable[[], bool] = lambda: True
    ) -> Iterator[None]:
        """Hold the pipeline with ``adapter`` active (None: the base alone).

        ``alive`` is asked once the generation's turn came, before an adapter
        is loaded: AdapterGone if its model was deleted while it waited.
        """
        key = adapter.key if adapter is not None else ""
        ticket = object()
        with self._cond:
            self._queue.append((ticket, key))
            try:
                while not self._may_enter(ticket, key):
                    self._cond.wait()
            finally:
                self._queue.remove((ticket, key))
            try:
                if adapter is not None and not alive():
                    raise AdapterGone(adapter.source)
                if key != self._active:
                    self._switch(adapter)
            finally:
                self._cond.notify_all()
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def unload(self, source: str) -> bool:
        """Unload the adapter of that directory once nothing runs on it; True if it was loaded."""
        key = AdapterRef(source, 0).key
        ticket = object()
        with self._cond:
            if key not in self._loaded:
                return False
            self._queue.append((ticket, None))
            try:
                while not self._may_enter(ticket, None):
                    self._cond.wait()
            finally:
                self._queue.remove((ticket, None))
            try:
                if key in self._loaded:
                    self._delete(key)
            finally:
                self._cond.notify_all()
            return True

    def loaded(self) -> list[str]:
        """Loaded adapters' directories, least recently used first."""
        with self._cond:
            return [slot.ref.source for slot in self._loaded.values()]

    def _may_enter(self, ticket: object, key: str | None) -> bool:
        ahead = []
        for other, other_key in self._queue:
            if other is ticket:
                break
            ahead.append(other_key)
        if any(k != key or k is None for k in ahead):
            return False  # first come, first served across adapters
        if self._running == 0:
            return True
        return key is not None and key == self._active

    def _switch(self, adapter: AdapterRef | None) -> None:
        """Make ``adapter`` the pipeline's only active one (nothing runs now)."""
        pipe = self._pipeline
        self._active = None  # until the switch is complete
        if adapter is None:
            if self._loaded:
                pipe.disable_lora()
            self._active = ""
            return
        key = adapter.key
        if key not in self._loaded:
            self._loaded[key] = self._load(adapter)
            log.info("loaded adapter %s (%d loaded)", key, len(self._loaded))
        self._loaded.move_to_end(key)
        pipe.enable_lora()
        pipe.set_adapters([self._loaded[key].name])
        self.switches += 1
        self._active = key

    def _load(self, adapter: AdapterRef) -> _Slot:
        """Load an adapter, making room first: into the slot of the least
        recently used adapter that must go, where a hot swap is exact, else
        afresh under a new name."""
        pipe = self._pipeline
        shapes = swappable_shapes(adapter.source)
        leaving = self._leaving(adapter.size_bytes)
        reuse = None
        if self._hotswap:
            reuse = next((k for k in leaving if _fits(shapes, self._loaded[k])), None)
        for key in leaving:
            if key != reuse:
                self._delete(key)
        if reuse is not None:
            name = self._loaded.pop(reuse).name
            try:
                pipe.load_lora_weights(adapter.source, adapter_name=name, hotswap=True)
            except (RuntimeError, ValueError, NotImplementedError) as refused:
                log.info("adapter %s not hot-swapped (%s); loading it afresh", adapter.key, refused)
                pipe.delete_adapters(name)
            else:
                _keep_swapped_scaling(pipe.unet, name)
                self._on_load("hot_swap")
                return _Slot(adapter, name, shapes)
        name = next(self._names)
        pipe.load_lora_weights(adapter.source, adapter_name=name)
        self._on_load("fresh")
        return _Slot(adapter, name, shapes)

    def _leaving(self, incoming: int) -> list[str]:
        """The adapters to unload, least recently used first, so that one of
        ``incoming`` bytes fits."""
        count = len(self._loaded)
        size = sum(slot.ref.size_bytes for slot in self._loaded.values())
        leaving = []
        for key, slot in self._loaded.items():
            if count + 1 <= self._max_count and size + incoming <= self._max_bytes:
                break
            leaving.append(key)
            count -= 1
            size -= slot.ref.size_bytes
        return leaving

    def _delete(self, key: str) -> None:
        self._pipeline.delete_adapters(self._loaded.pop(key).name)
        self._active = None
        log.info("unloaded adapter %s (%d loaded)", key, len(self._loaded))
