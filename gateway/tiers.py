"""Tiers: concurrency, training jobs and GPU-second budgets per window.

Defaults are DESIGN.md's table; operators replace them with one YAML file::

    tiers:
      free: {concurrent_requests: 1, training_jobs: 0,
             windows: {5h: 300, 7d: 3000}}
      pro:  {concurrent_requests: 3, training_jobs: 1,
             windows: {5h: 15000, 7d: 150000}}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WINDOW_SECONDS = {"5h": 5 * 3600, "7d": 7 * 24 * 3600}


@dataclass(frozen=True)
class Window:
    """A GPU-second budget over a sliding window."""

    name: str
    seconds: int
    limit_gpu_seconds: float


@dataclass(frozen=True)
class Tier:
    """The limits a key's tenant gets."""

    name: str
    concurrent_requests: int
    training_jobs: int
    windows: tuple[Window, ...]


def _tier(name: str, spec: Mapping[str, Any]) -> Tier:
    try:
        concurrent = int(spec["concurrent_requests"])
        training = int(spec.get("training_jobs", 0))
        windows = tuple(
            Window(str(w), WINDOW_SECONDS[str(w)], float(limit))
            for w, limit in dict(spec.get("windows", {})).items()
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"tiers.{name}: invalid tier ({error!r})") from error
    if concurrent < 1 or training < 0 or any(w.limit_gpu_seconds < 0 for w in windows):
        raise ValueError(f"tiers.{name}: limits must be positive")
    return Tier(name, concurrent, training, windows)


DEFAULT_TIERS: dict[str, Tier] = {
    t.name: t
    for t in (
        _tier("free", {"concurrent_requests": 1, "training_jobs": 0,
                       "windows": {"5h": 300, "7d": 3_000}}),
        _tier("pro", {"concurrent_requests": 3, "training_jobs": 1,
                      "windows": {"5h": 15_000, "7d": 150_000}}),
        _tier("max", {"concurrent_requests": 10, "training_jobs": 3,
                      "windows": {"5h": 75_000, "7d": 750_000}}),
    )
}  # fmt: skip


def load_tiers(path: str) -> dict[str, Tier]:
    """Tiers from a YAML file, or the defaults when path is empty."""
    if not path:
        return dict(DEFAULT_TIERS)
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    tiers = data.get("tiers") if isinstance(data, dict) else None
    if not isinstance(tiers, dict) or not tiers:
        raise ValueError(f"{path}: expected a top-level 'tiers' mapping")
    return {str(name): _tier(str(name), spec) for name, spec in tiers.items()}
