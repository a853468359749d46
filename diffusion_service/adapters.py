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

Batching several adapters in one UNet pass is what peft's mixed-adapter
inference would allow, but diffusers' Stable Diffusion pipeline takes no
per-image adapter names; serialising per base costs nothing at the default
one generation at a time (see docs/benchmarks.md for the rotating-tenant
measurement).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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


class AdapterSlots:
    """The adapters loaded into one base pipeline, and which one runs."""

    def __init__(
        self,
        pipeline: Any,
        max_count: int,
        max_bytes: int,
        on_load: Callable[[], None] = lambda: None,
    ) -> None:
        self._pipeline = pipeline
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._on_load = on_load
        self._cond = threading.Condition()
        self._loaded: OrderedDict[str, AdapterRef] = OrderedDict()
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
            return [ref.source for ref in self._loaded.values()]

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
            self._make_room(adapter.size_bytes)
            pipe.load_lora_weights(adapter.source, adapter_name=key)
            self._loaded[key] = adapter
            self._on_load()
            log.info("loaded adapter %s (%d loaded)", key, len(self._loaded))
        self._loaded.move_to_end(key)
        pipe.enable_lora()
        pipe.set_adapters([key])
        self.switches += 1
        self._active = key

    def _make_room(self, incoming: int) -> None:
        while self._loaded and (
            len(self._loaded) + 1 > self._max_count
            or sum(r.size_bytes for r in self._loaded.values()) + incoming > self._max_bytes
        ):
            self._delete(next(iter(self._loaded)))

    def _delete(self, key: str) -> None:
        self._pipeline.delete_adapters(key)
        del self._loaded[key]
        self._active = None
        log.info("unloaded adapter %s (%d loaded)", key, len(self._loaded))
