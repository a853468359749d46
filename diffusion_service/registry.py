"""The models a diffusion worker knows, and who may use them.

Base models are shared by every tenant. A fine-tuned model belongs to the
tenant whose job trained it, and its name to that tenant's namespace: two
tenants may each own a model called ``my-dog``, and a fine-tuned name never
shadows a base model's. Another tenant's model is, to everyone else, exactly
a model that does not exist: absent from ListModels, NOT_FOUND with the same
message as a missing name, so no tenant can squat a name another wants or
learn that it exists. :meth:`ModelRegistry.register_fine_tuned`
is the hook the DreamBooth trainer calls when a job succeeds. With a
:class:`ModelPersistence` (the training job store), fine-tuned registrations
are saved as they are made, deleted with their files, and read back by
:meth:`ModelRegistry.refresh` at start-up, so a restart forgets none. Where
replicas share the store, the store is the truth for fine-tuned models: one
registered by another replica is found by :meth:`ModelRegistry.refresh`
(called when the store says a job succeeded) or at the first request that
names it, and one deleted there is dropped at the next request that names
it, so no replica needs a restart.

Registering reads the model's configs and tokenizer (small files, no
weights): the default image size comes from the UNet's sample size times
the VAE's downsampling, and the tokenizer checks prompt lengths before a
request is queued. A fine-tune with a tune manifest (a LoRA adapter, or a
full tune's changed parts: see :mod:`diffusion_service.tunes`) is
described by its base model and sized on disk; a whole pipeline directory
is described by itself. Weights are loaded later, on demand, by
:class:`diffusion_service.pipelines.PipelineCache`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from diffusion_service.config import BaseModel
from diffusion_service.domain import ModelInfo, Origin, TuneKind
from diffusion_service.tunes import TuneManifest, disk_size, read_manifest
from dreamsight_server.demo_marker import read_marker
from dreamsight_server.errors import FailedPrecondition, NotFound, PermissionDenied

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")


@dataclass(frozen=True)
class SavedRegistration:
    """A fine-tuned model registration as persisted."""

    name: str
    path: str
    owner_tenant: str
    base_model: str
    job_id: str


class ModelPersistence(Protocol):
    """Where fine-tuned registrations outlive the process."""

    def saved(self) -> list[SavedRegistration]:
        """Every persisted registration."""
        ...

    def save(self, registration: SavedRegistration) -> None:
        """Persist one registration."""
        ...

    def forget(self, registration: SavedRegistration) -> None:
        """Delete one registration, and its files where the store owns them."""
        ...

    def find(self, name: str, tenant: str) -> SavedRegistration | None:
        """The tenant's persisted registration of that name (another replica's too)."""
        ...


@dataclass(frozen=True)
class Description:
    """What registration learns from a model's small files."""

    default_width: int
    default_height: int
    demo: bool
    tokenizer: Any
    """The model's CLIP tokenizer, used only to count prompt tokens."""
    max_tokens: int
    max_steps: int
    """Half the scheduler's training timesteps: more breaks some schedulers."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered model."""

    info: ModelInfo
    source: str
    """Where the weights are: a directory or hub id (also for fine-tuned models)."""
    description: Description
    tune: TuneManifest | None = None
    """A fine-tune's manifest; None for base models and whole pipelines."""
    base_source: str = ""
    """A fine-tune's base model's directory or hub id."""

    @property
    def adapter(self) -> bool:
        """Whether this is a LoRA adapter served on its base pipeline."""
        return self.tune is not None and self.tune.tune_kind is TuneKind.LORA


def describe(source: str) -> Description:
    """Read a Stable Diffusion pipeline's configs and tokenizer (no weights)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    unet: Any = UNet2DConditionModel.load_config(source, subfolder="unet")
    vae: Any = AutoencoderKL.load_config(source, subfolder="vae")
    scheduler: Any = DDIMScheduler.load_config(source, subfolder="scheduler")
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample = unet.get("sample_size", 64)
    height, width = (sample, sample) if isinstance(sample, int) else (sample[0], sample[1])
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    local = Path(source)
    return Description(
        default_width=int(width) * scale,
        default_height=int(height) * scale,
        demo=local.is_dir() and read_marker(local) is not None,
        tokenizer=tokenizer,
        max_tokens=int(tokenizer.model_max_length),
        max_steps=int(scheduler.get("num_train_timesteps", 1000)) // 2,
    )


class ModelRegistry:
    """Thread-safe map of base models (by name) and fine-tuned models (by
    owner tenant and name), with tenancy checks."""

    def __init__(
        self,
        describer: Callable[[str], Description] = describe,
        persistence: ModelPersistence | None = None,
    ) -> None:
        self._describe = describer
        self._persistence = persistence
        self._lock = threading.Lock()
        self._base: dict[str, ModelEntry] = {}
        self._fine_tuned: dict[tuple[str, str], ModelEntry] = {}
        """Keyed by (owner tenant, name)."""
        self._default = ""

    @property
    def default_model(self) -> str:
        """The base model used when a request names none."""
        return self._default

    def add_base(self, model: BaseModel) -> ModelInfo:
        """Register a base model (reads its configs; call off the event loop)."""
        _check_name(model.name)
        desc = self._describe(model.source)
        info = ModelInfo(
            name=model.name,
            origin=Origin.DEMO if desc.demo else Origin.PRETRAINED,
            demo=desc.demo,
            default_width=desc.default_width,
            default_height=desc.default_height,
            source=model.source,
        )
        with self._lock:
            taken = model.name in self._base or any(
                name == model.name for _, name in self._fine_tuned
            )
            if taken:
                raise FailedPrecondition(f"model {model.name!r} already exists")
            self._base[model.name] = ModelEntry(info, model.source, desc)
            self._default = self._default or model.name
        return info

    def register_fine_tuned(
        self,
        name: str,
        path: str | Path,
        owner_tenant: str,
        base_model: str,
        job_id: str,
        persist: bool = True,
    ) -> ModelInfo:
        """Register a tenant's fine-tuned pipeline directory under ``name``.

        Names are per tenant: ``name`` is taken only by a base model or by
        one of ``owner_tenant``'s own models, never by another tenant's.
        Raises NotFound for an unknown base model and FailedPrecondition for
        a taken name or an unreadable directory. The registration is
        persisted (when the registry has a persistence) before it is
        visible. Reads small files: call it off the event loop.
        """
        _check_name(name)
        if not owner_tenant:
            raise FailedPrecondition("a fine-tuned model needs an owner tenant")
        key = (owner_tenant, name)
        with self._lock:
            base = self._base.get(base_model)
            if base is None:
                raise NotFound(f"base model {base_model!r} not found")
            if name in self._base or key in self._fine_tuned:
                raise FailedPrecondition(f"model {name!r} already exists")
        try:
            tune = read_manifest(Path(path))
            desc = base.description if tune is not None else self._describe(str(path))
            size = disk_size(Path(path))
        except (OSError, ValueError) as error:
            raise FailedPrecondition(f"{path} is not a fine-tune or a pipeline") from error
        info = ModelInfo(
            name=name,
            origin=Origin.FINE_TUNED,
            # A fine-tune of a toy is a toy.
            demo=desc.demo or base.info.demo,
            default_width=desc.default_width,
            default_height=desc.default_height,
            base_model=base_model,
            job_id=job_id,
            owner=owner_tenant,
            kind=tune.tune_kind if tune is not None else TuneKind.FULL,
            size_bytes=size,
        )
        with self._lock:
            if name in self._base or key in self._fine_tuned:
                raise FailedPrecondition(f"model {name!r} already exists")
            if persist and self._persistence is not None:
                self._persistence.save(
                    SavedRegistration(name, str(path), owner_tenant, base_model, job_id)
                )
            self._fine_tuned[key] = ModelEntry(info, str(path), desc, tune, base.source)
        return info

    def restore(self) -> int:
        """Register every persisted fine-tuned model not yet registered; returns how many.

        A registration that no longer loads (its directory is gone, its base
        model is no longer configured) is logged and skipped, and stays
        persisted, so it comes back once the cause is fixed.
        """
        if self._persistence is None:
            return 0
        restored = 0
        for saved in self._persistence.saved():
            with self._lock:
                known = self._fine_tuned.get((saved.owner_tenant, saved.name))
            if known is not None and known.info.job_id == saved.job_id:
                continue
            if self._adopt(saved):
                restored += 1
        return restored

    refresh = restore

    def _adopt(self, saved: SavedRegistration) -> bool:
        """Register a persisted model (persist=False); False when it does not load."""
        try:
            self.register_fine_tuned(
                saved.name,
                saved.path,
                saved.owner_tenant,
                saved.base_model,
                saved.job_id,
                persist=False,
            )
        except (NotFound, FailedPrecondition) as error:
            with self._lock:
                known = self._fine_tuned.get((saved.owner_tenant, saved.name))
            if known is not None and known.info.job_id == saved.job_id:
                # Adopted meanwhile by another thread (a refresh racing a
                # request that names the model): the same registration.
                return True
            log.warning("fine-tuned model %s not restored: %s", saved.name, error.message)
            return False
        return True

    def get(self, name: str, tenant: str) -> ModelEntry | None:
        """What ``name`` means to ``tenant``: a base model or one of its own
        fine-tuned models; None otherwise (another tenant's is None too)."""
        with self._lock:
            return self._lookup(name, tenant)

    def resolve(self, name: str, tenant: str) -> ModelEntry:
        """The model a tenant may generate with; empty name means the default.

        Another tenant's model raises the very NotFound a missing one does.
        """
        with self._lock:
            entry = self._lookup(name or self._default, tenant)
        if self._persistence is not None and name and (entry is None or entry.info.fine_tuned):
            entry = self._as_stored(name, tenant, entry)
        if entry is None:
            raise NotFound(f"model {name!r} not found")
        return entry

    def _as_stored(self, name: str, tenant: str, entry: ModelEntry | None) -> ModelEntry | None:
        """A fine-tuned model as the shared store has it now: one trained on
        another replica a moment ago is adopted, one deleted there is dropped."""
        assert self._persistence is not None
        saved = self._persistence.find(name, tenant)
        if entry is not None and saved is not None and saved.job_id == entry.info.job_id:
            return entry
        if entry is not None:
            with self._lock:
                if self._fine_tuned.get((tenant, name)) is entry:
                    del self._fine_tuned[(tenant, name)]
        if saved is None or not self._adopt(saved):
            return None
        with self._lock:
            return self._lookup(name, tenant)

    def contains(self, entry: ModelEntry) -> bool:
        """Whether this very entry is still registered (not deleted or replaced)."""
        info = entry.info
        with self._lock:
            if info.fine_tuned:
                return self._fine_tuned.get((info.owner, info.name)) is entry
            return self._base.get(info.name) is entry

    def visible(self, tenant: str) -> list[ModelInfo]:
        """Base models (in configured order), then the tenant's fine-tuned models."""
        with self._lock:
            base = [e.info for e in self._base.values()]
            own = [e.info for (owner, _), e in self._fine_tuned.items() if owner == tenant]
        return base + own

    def _lookup(self, name: str, tenant: str) -> ModelEntry | None:
        # Base names cannot be shadowed (registration refuses them).
        return self._base.get(name) or self._fine_tuned.get((tenant, name))

    def delete(self, name: str, tenant: str) -> ModelEntry:
        """Forget one of the tenant's fine-tuned models, and delete its
        persisted registration and the files the persistence owns (a
        directory registered from elsewhere is left alone).

        A base model is PermissionDenied (base models are public: that
        reveals nothing); another tenant's model is NotFound, as a missing
        one is.
        """
        with self._lock:
            if name in self._base:
                raise PermissionDenied(f"model {name!r} is a shared base model")
            entry = self._fine_tuned.pop((tenant, name), None)
            if entry is None:
                raise NotFound(f"model {name!r} not found")
        if self._persistence is not None:
            info = entry.info
            self._persistence.forget(
                SavedRegistration(name, entry.source, info.owner, info.base_model, info.job_id)
            )
        return entry


def _check_name(name: str) -> None:
    if not MODEL_NAME.fullmatch(name):
        raise FailedPrecondition(
            f"model name {name!r} must be 1 to 128 letters, digits or ._:/@+- "
            "starting with a letter or digit"
        )


def count_tokens(entry: ModelEntry, text: str) -> int:
    """Tokens of a prompt as the pipeline's text encoder sees it (start/end included)."""
    ids = entry.description.tokenizer(text, truncation=False)["input_ids"]
    return len(ids)
