"""The label of a demo model: its marker file and its model card.

The services only read the marker (``dreamsight_server.demo_marker``, so that
ListModels reports ``demo: true``); writing it is the demo builders' and
trainers' business, so it lives here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dreamsight_server.demo_marker import MARKER_FILE


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
            f"checked by a deterministic judge (dreamsight_demo.shapes.judge). It knows {knows},",
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
