"""What a training worker process tells its manager: one typed schema for both.

The worker (:mod:`diffusion_service.dreambooth.worker`) writes one JSON object
per line on its standard output, made by :func:`encode`; the manager
(:mod:`diffusion_service.jobs.manager`) reads them back with :func:`decode`.
Both sides name the same dataclasses, so a field renamed on one side is a
type error on the other, not a silently dropped value. These are worker
messages, not the job events a watcher sees (:class:`diffusion_service.domain.JobEvent`):
the manager turns some of them into job events and keeps the rest to itself.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal


@dataclass(frozen=True)
class WorkerStarted:
    """The worker holds the job's lock and listens for commands."""

    pid: int


@dataclass(frozen=True)
class TrainingBegan:
    """Lightning starts fitting, at ``step`` (above 0 when resumed from a checkpoint)."""

    step: int


@dataclass(frozen=True)
class ClassImagesDrawn:
    """Class-prior images ready so far."""

    done: int
    total: int


@dataclass(frozen=True)
class StepFinished:
    """An optimizer step finished."""

    step: int
    total: int
    loss: float | None
    lr: float | None
    eta_s: float | None


@dataclass(frozen=True)
class CheckpointWritten:
    """A checkpoint of this step is on disk."""

    step: int


@dataclass(frozen=True)
class ValidationRendered:
    """A validation image, at ``path`` relative to the job directory."""

    step: int
    path: str


@dataclass(frozen=True)
class Exported:
    """The pipeline is in the export directory (the worker's last message)."""

    step: int


@dataclass(frozen=True)
class Stopped:
    """The worker stopped early: cancelled (nothing kept) or shut down (checkpointed)."""

    why: Literal["cancel", "shutdown"]


@dataclass(frozen=True)
class Failed:
    """Training failed; ``reason`` is safe to show the job's owner."""

    reason: str


WorkerEvent = (
    WorkerStarted
    | TrainingBegan
    | ClassImagesDrawn
    | StepFinished
    | CheckpointWritten
    | ValidationRendered
    | Exported
    | Stopped
    | Failed
)
_KINDS: dict[str, type[Any]] = {
    "started": WorkerStarted,
    "training": TrainingBegan,
    "class_images": ClassImagesDrawn,
    "step": StepFinished,
    "checkpoint": CheckpointWritten,
    "validation": ValidationRendered,
    "exported": Exported,
    "stopped": Stopped,
    "failed": Failed,
}
_NAMES = {cls: kind for kind, cls in _KINDS.items()}
_FLOATS = {"loss", "lr", "eta_s"}


def encode(event: WorkerEvent) -> str:
    """One line (without its newline) for the worker's standard output."""
    body = {k: v for k, v in asdict(event).items()}
    for name in _FLOATS & body.keys():
        value = body[name]
        if value is not None and not math.isfinite(value):
            body[name] = None  # JSON has no NaN
    return json.dumps({"event": _NAMES[type(event)], "time": time.time(), **body})


def decode(line: str | bytes) -> WorkerEvent:
    """The event on one line; ValueError for anything that is not one."""
    try:
        data = json.loads(line)
        cls = _KINDS[data["event"]]
        values = {f.name: data[f.name] for f in fields(cls)}
    except (TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"not a worker event: {error}") from None
    event: WorkerEvent = cls(**values)
    for f in fields(cls):
        if not _typed(getattr(event, f.name), f.name):
            raise ValueError(f"worker event {data['event']}: bad {f.name}")
    return event


def _typed(value: Any, name: str) -> bool:
    if name in _FLOATS:
        return value is None or (isinstance(value, int | float) and not isinstance(value, bool))
    if name in ("why", "reason", "path"):
        return isinstance(value, str) and (name != "why" or value in ("cancel", "shutdown"))
    return isinstance(value, int) and not isinstance(value, bool)
