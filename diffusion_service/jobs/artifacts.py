"""The artifacts directory: where DreamBooth jobs and their models live.

Under the artifacts directory (a local directory, or on Kubernetes a
ReadWriteMany volume every replica mounts at the same path: a job resumed
on another replica finds its checkpoints there, and a model trained on one
is served by all): ``jobs/<job_id>/`` (the instance images, job.json, checkpoints,
TensorBoard logs, validation images and the worker's log),
``class-images/<key>/`` (the class-prior cache shared by all jobs) and
``models/<name>/`` (fine-tunes as :mod:`diffusion_service.tunes` describes
them; ``.partial-<job_id>`` while a worker writes one). Job ids come from
``secrets.token_urlsafe`` and model names must match :data:`FINE_TUNED_NAME`,
and every path is made by :func:`child`, which refuses a name that could
leave its directory, so no id or name from a caller ever reaches a path
outside it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from diffusion_service.jobs.store import JobStore, SavedModel
from diffusion_service.registry import SavedRegistration
from diffusion_service.tunes import is_export
from dreamsight_server.errors import FailedPrecondition

JOB_ID = re.compile(r"[A-Za-z0-9_-]{22}")
"""What secrets.token_urlsafe(16) makes."""
FINE_TUNED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""A fine-tuned model's name: one safe path component."""


class JobFiles:
    """The artifacts directory layout (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs = root / "jobs"
        self.models = root / "models"
        self.class_images = root / "class-images"

    def job_dir(self, job_id: str) -> Path:
        """A job's work directory."""
        return child(self.jobs, job_id, JOB_ID)

    def model_dir(self, name: str) -> Path:
        """Where a fine-tuned model of that name lives."""
        return child(self.models, name, FINE_TUNED_NAME)

    def partial_export(self, job_id: str) -> Path:
        """Where a job's worker writes its pipeline before it is moved into place."""
        return self.models / f".partial-{child(self.jobs, job_id, JOB_ID).name}"


class FineTunedModels:
    """The registry's persistence: rows in the job store, files in models/."""

    def __init__(self, store: JobStore, files: JobFiles) -> None:
        self._store = store
        self._files = files

    def saved(self) -> list[SavedRegistration]:
        return [
            SavedRegistration(m.name, m.path, m.tenant, m.base_model, m.job_id)
            for m in self._store.models()
        ]

    def save(self, registration: SavedRegistration) -> None:
        r = registration
        self._store.save_model(SavedModel(r.name, r.owner_tenant, r.base_model, r.job_id, r.path))

    def find(self, name: str, tenant: str) -> SavedRegistration | None:
        m = self._store.find_model(name, tenant)
        return SavedRegistration(m.name, m.path, m.tenant, m.base_model, m.job_id) if m else None

    def forget(self, registration: SavedRegistration) -> None:
        self._store.delete_model(registration.name, registration.owner_tenant)
        path = Path(registration.path)
        # Only directories this service exported; a registered outside
        # directory (an operator's) is never deleted.
        if path.parent.resolve() == self._files.models.resolve() and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def child(root: Path, name: str, pattern: re.Pattern[str]) -> Path:
    """root/name, for a name that matches pattern and cannot leave root."""
    if not pattern.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"unsafe path component {name!r}")
    path = root / name
    if path.parent != root:
        raise ValueError(f"unsafe path component {name!r}")
    return path


def write_images(directory: Path, images: tuple[bytes, ...]) -> None:
    """Keep a job's instance images as sent (the worker decodes them again)."""
    directory.mkdir(parents=True)
    for index, data in enumerate(images):
        (directory / f"{index:02d}.img").write_bytes(data)


def move_into_place(partial: Path, final: Path) -> None:
    """Make a worker's finished export the model directory, in one rename."""
    if not is_export(partial):
        raise FailedPrecondition("the worker reported an export that is not there")
    if final.exists():  # left by an attempt that died before registering it
        shutil.rmtree(final)
    partial.rename(final)
