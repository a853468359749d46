"""The marker that labels a demo model directory as a toy.

Every demo model directory holds ``dreamsight_demo.json``, which the services
read so that ListModels reports ``demo: true`` (the demo toolchain writes it,
with a model card: ``dreamsight_demo.model_card``). Real checkpoints have none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER_FILE = "dreamsight_demo.json"


def read_marker(model_dir: Path) -> dict[str, Any] | None:
    """The marker of a demo model directory, or None for any other model."""
    path = model_dir / MARKER_FILE
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data if data.get("demo") is True else None
