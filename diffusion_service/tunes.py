"""What a DreamBooth job exports, as files: the tune manifest and its sizes.

A LoRA job's directory is what diffusers' ``save_lora_weights`` writes
(``pytorch_lora_weights.safetensors``, with the adapters' peft configs in its
metadata), so plain diffusers loads it with ``pipe.load_lora_weights(dir)``.
A full tune's holds only the parts it changed, each a diffusers model
directory (``unet/``, and ``text_encoder/`` when it was trained); the rest
comes from its base model. Both carry :data:`MANIFEST`, which says the
kind, the base model and the settings; a directory without one but with a
``model_index.json`` is a whole pipeline (what jobs exported before LoRA),
served as a full tune that needs no base. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffusion_service.domain import TuneKind

MANIFEST = "dreamsight_tune.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""diffusers' standard LoRA file name."""
PIPELINE_INDEX = "model_index.json"


@dataclass(frozen=True)
class TuneManifest:
    """What a fine-tune directory holds and what it needs from its base."""

    kind: str
    """``lora`` or ``full``."""
    base_model: str
    """The base model's name in the service that trained it."""
    job_id: str
    parts: tuple[str, ...] = ()
    """A full tune's changed parts (``unet``, ``text_encoder``)."""
    rank: int = 0
    lora_alpha: float = 0.0
    lora_layers: tuple[str, ...] = ()
    text_encoder_lora: bool = False
    scheduler_overrides: dict[str, Any] = field(default_factory=dict)
    """Scheduler settings a full tune's pipeline uses over its base's."""

    @property
    def tune_kind(self) -> TuneKind:
        """The kind as the domain type."""
        return TuneKind(self.kind)

    def write(self, directory: Path) -> None:
        """Write the manifest into an export directory."""
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=1, sort_keys=True))


def read_manifest(directory: Path) -> TuneManifest | None:
    """The directory's manifest; None for a whole pipeline (no manifest).

    Raises ValueError for a directory that is neither.
    """
    path = directory / MANIFEST
    if not path.is_file():
        if (directory / PIPELINE_INDEX).is_file():
            return None
        raise ValueError(f"{directory} holds no fine-tune")
    data = json.loads(path.read_text())
    for key in ("parts", "lora_layers"):
        data[key] = tuple(data.get(key, ()))
    manifest = TuneManifest(**data)
    if manifest.kind not in {k.value for k in TuneKind}:
        raise ValueError(f"{path}: unknown kind {manifest.kind!r}")
    return manifest


def is_export(directory: Path) -> bool:
    """Whether a directory is a finished export (manifest or whole pipeline)."""
    return (directory / MANIFEST).is_file() or (directory / PIPELINE_INDEX).is_file()


def disk_size(directory: Path) -> int:
    """Bytes of the regular files under a directory."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
