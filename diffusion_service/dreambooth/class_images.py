"""Class-prior images: drawn by the base model itself, cached for reuse.

The cache key is (base model name and source, class prompt, resolution,
count): a second job of any tenant with the same class reuses the images and
generates nothing. Images are generated in batches, image i from a CPU
generator seeded with ``seed + i``, written as PNGs into a ``.partial``
directory that becomes the cache entry by one rename once complete. A job
killed half-way leaves the images it finished; the next job with the same key
keeps them and draws only the rest. An exclusive lock per key makes a second
job wait for the first instead of drawing the same images twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMPLETE = "class_images.json"


class StopRequested(Exception):
    """The job was cancelled or the service is stopping."""


@dataclass(frozen=True)
class ClassImageKey:
    """What makes two jobs' class images interchangeable."""

    base_model: str
    base_source: str
    prompt: str
    resolution: int
    count: int

    def digest(self) -> str:
        """A file-name-safe, fixed-length name for this key."""
        text = json.dumps(self.__dict__, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_class_images(
    key: ClassImageKey,
    cache_root: Path,
    seed: int,
    load_pipeline: Callable[[], Any],
    batch_size: int,
    inference_steps: int,
    guidance_scale: float,
    on_progress: Callable[[int, int], None],
    should_stop: Callable[[], bool],
) -> Path:
    """The directory of ``key.count`` class images, generating what is missing.

    ``on_progress(done, total)`` is called with the cached count first, then
    after every batch. ``should_stop`` is polled between denoising steps;
    when it turns true, StopRequested is raised (finished images are kept).
    """
    cache_root.mkdir(parents=True, exist_ok=True)
    entry = cache_root / key.digest()
    with _locked(cache_root / f"{key.digest()}.lock"):
        if (entry / COMPLETE).is_file():
            on_progress(key.count, key.count)
            return entry
        partial = cache_root / f"{key.digest()}.partial"
        partial.mkdir(exist_ok=True)
        done = _finished(partial, key.count)
        on_progress(done, key.count)
        if done < key.count:
            _generate(
                key, partial, done, seed, load_pipeline(), batch_size, inference_steps,
                guidance_scale, on_progress, should_stop,
            )  # fmt: skip
        (partial / COMPLETE).write_text(json.dumps(key.__dict__, indent=1, sort_keys=True))
        if entry.exists():
            shutil.rmtree(entry)
        partial.rename(entry)
        return entry


def _name(index: int) -> str:
    return f"{index:05d}.png"


def _finished(directory: Path, count: int) -> int:
    """Images 0..n-1 that were written completely (a PNG is renamed into place)."""
    done = 0
    while done < count and (directory / _name(done)).is_file():
        done += 1
    return done


def _generate(
    key: ClassImageKey,
    out: Path,
    start: int,
    seed: int,
    pipe: Any,
    batch_size: int,
    inference_steps: int,
    guidance_scale: float,
    on_progress: Callable[[int, int], None],
    should_stop: Callable[[], bool],
) -> None:
    import torch

    def step_end(p: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if should_stop():
            raise StopRequested
        return tensors

    for first in range(start, key.count, batch_size):
        if should_stop():
            raise StopRequested
        indices = range(first, min(key.count, first + batch_size))
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in indices]
        with torch.no_grad():
            images = pipe(
                key.prompt,
                height=key.resolution,
                width=key.resolution,
                num_inference_steps=inference_steps,
                guidance_scale=guidance_scale,
                num_images_per_prompt=len(generators),
                generator=generators,
                callback_on_step_end=step_end,
            ).images
        for index, image in zip(indices, images, strict=True):
            tmp = out / f"{_name(index)}.tmp"
            image.save(tmp, format="PNG")
            tmp.replace(out / _name(index))
        on_progress(indices[-1] + 1, key.count)
