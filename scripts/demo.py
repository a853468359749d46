"""The embedded demo: build the tiny demo models and show the contract.

    python scripts/demo.py [MODELS_DIR]

Builds the demo LLaVA and Stable Diffusion models (random weights, clearly
labelled) into MODELS_DIR on first run, prints every public RPC of the
contract, and draws one image with the demo pipeline. Later issues grow this
into the full demo (`dreamsight up`, chat, generation, training).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dreamsight.common.v1 import common_pb2
from dreamsight.diffusion.v1 import diffusion_pb2
from dreamsight.gateway.v1 import admin_pb2, usage_pb2
from dreamsight.vision.v1 import vision_pb2

from dreamsight_server.demo_marker import read_marker

MODELS = {
    "llava-demo": "vision_service.demo_model",
    "sd-demo": "diffusion_service.demo_model",
}


def ensure_models(models_dir: Path) -> dict[str, Path]:
    """Build each demo model unless a marked one is already there."""
    built = {}
    for name, module in MODELS.items():
        path = models_dir / name
        if read_marker(path) is None:
            print(f"building demo model {name} (random weights) into {path} ...", flush=True)
            subprocess.run([sys.executable, "-m", module, str(path)], check=True)
        built[name] = path
    return built


def print_contract() -> None:
    """Every service and RPC of the public contract."""
    print(f"\ncontract (common types: {', '.join(common_pb2.DESCRIPTOR.message_types_by_name)})")
    for module in (vision_pb2, diffusion_pb2, usage_pb2, admin_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            print(f"  {service.full_name}")
            for method in service.methods:
                stream = "stream " if method.server_streaming else ""
                signature = f"{method.input_type.name}) -> {stream}{method.output_type.name}"
                print(f"    {method.name}({signature}")


def draw_one(sd_dir: Path, out: Path) -> None:
    """One 64x64 image from the demo pipeline (noise: the weights are random)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a photo of a red circle",
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    image.save(out)
    print(f"\ndemo image (random weights, so noise) written to {out}")


def main() -> None:
    models_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".dreamsight/models")
    models = ensure_models(models_dir)
    for name, path in models.items():
        print(f"demo model {name}: {path} (demo: {read_marker(path) is not None})")
    print_contract()
    draw_one(models["sd-demo"], models_dir.parent / "demo.png")


if __name__ == "__main__":
    main()
