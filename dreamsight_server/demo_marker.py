"""The marker that labels a locally built demo model as a toy.

Every demo model directory holds ``dreamsight_demo.json`` (read by services so
that ListModels reports ``demo: true``) and a ``README.md`` model card for
people. Real checkpoints have neither.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MARKER_FILE = "dreamsight_demo.json"


def write_marker(
    out_dir: Path,
    *,
    kind: str,
    seed: int,
    builder: str,
    knows: str,
    details: dict[str, Any],
    weights: str = "random",
    training: Sequence[str] = (),
) -> None:
    """Write the marker and the model card into a demo model directory.

    ``weights`` is "random" for the plumbing-only builds or "trained" for the
    demo models taught the synthetic shapes world; ``training`` lines tell how.
    """
    marker = {
        "demo": True,
        "kind": kind,
        "weights": weights,
        "seed": seed,
        "builder": builder,
        "knows": knows,
        **details,
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    if weights == "random":
        intro = [
            f"# dreamsight demo model ({kind}): a toy, not a real model",
            "",
            "Built locally by dreamsight with random weights so that the whole system",
            f"runs offline on a CPU. It proves the plumbing; it knows {knows}.",
        ]
        how = [f"- rebuilt with: `{builder} DIR --seed {seed}` (same seed, same bytes)"]
    else:
        intro = [
            f"# dreamsight demo model ({kind}): a toy, trained on synthetic shapes",
            "",
            "Trained by dreamsight on CPU, on generated images of one flat shape on white,",
            "so that the whole system runs offline and what it answers or draws can be",
            f"checked by a deterministic judge (shapes.judge). It knows {knows},",
            "and nothing else: it is a toy, not a model for real images.",
        ]
        how = [
            *[f"- {line}" for line in training],
            f"- retrained with: `{builder} DIR --seed {seed}` (seeded, torch threads pinned;",
            "  the committed files' sha256 and the training configuration are in manifest.json)",
        ]
    lines = [
        *intro,
        "",
        *how,
        *[f"- {key}: {value}" for key, value in sorted(details.items())],
        "",
        "For real use, point the service at a Hugging Face directory or hub id.",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))


def read_marker(model_dir: Path) -> dict[str, Any] | None:
    """The marker of a demo model directory, or None for any other model."""
    path = model_dir / MARKER_FILE
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data if data.get("demo") is True else None
