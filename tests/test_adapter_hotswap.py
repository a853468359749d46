"""Adapters hot-swapped into a full cache's slots (diffusion_service.adapters):
each tenant's image is the one its adapter gives alone on a fresh pipeline,
byte for byte, whichever adapter held the slot before, and the base stays
untouched. Real diffusers and peft on the committed shapes demo model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffusion_service.adapters import AdapterRef, AdapterSlots
from dreamsight_demo.weights import COMMITTED_ROOT

pytestmark = pytest.mark.slow

SHAPES = COMMITTED_ROOT / "sd-shapes"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def pipeline() -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(SHAPES), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_adapter(
    base: Any, out: Path, seed: int, rank: int, alpha: float, modules: list[str], text: bool
) -> AdapterRef:
    """A diffusers LoRA file of random (non-zero) adapters, as an export holds."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = copy.deepcopy(base.unet)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules)
    unet.add_adapter(config)
    layers: dict[str, Any] = {}
    metadata: dict[str, Any] = {"unet_lora_adapter_metadata": config.to_dict()}
    modules_of = [unet]
    if text:
        encoder = copy.deepcopy(base.text_encoder)
        text_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
        encoder.add_adapter(text_config)
        modules_of.append(encoder)
    with torch.no_grad():
        for module in modules_of:
            for name, p in module.named_parameters():
                if ".lora_B." in name:
                    p.copy_(0.2 * torch.randn_like(p))
    layers["unet_lora_layers"] = get_peft_model_state_dict(unet)
    if text:
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(encoder)
        )
        metadata["text_encoder_lora_adapter_metadata"] = text_config.to_dict()
    StableDiffusionPipeline.save_lora_weights(out, **layers, **metadata)
    return AdapterRef(str(out), sum(f.stat().st_size for f in out.iterdir()))


def draw(pipe: Any) -> np.ndarray:
    out = pipe(
        "a red circle",
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
    ).images
    return np.asarray(out)


def alone(ref: AdapterRef) -> np.ndarray:
    pipe = pipeline()
    pipe.load_lora_weights(ref.source)
    return draw(pipe)


def test_hot_swapped_adapters_draw_what_they_draw_alone(tmp_path: Path) -> None:
    base = pipeline()
    adapters = {
        "a": write_adapter(base, tmp_path / "a", 1, 4, 4.0, ATTENTION, text=False),
        # Another scale (alpha over rank: 4, against a's 1) on the same tensors' shapes.
        "c": write_adapter(base, tmp_path / "c", 2, 4, 16.0, ATTENTION, text=False),
        # Modules a's and c's slot lacks.
        "b": write_adapter(base, tmp_path / "b", 3, 4, 8.0, [*ATTENTION, "conv1"], text=False),
        # Another rank.
        "d": write_adapter(base, tmp_path / "d", 4, 2, 8.0, ATTENTION, text=False),
        # Adapters on the text encoder too.
        "t": write_adapter(base, tmp_path / "t", 5, 4, 8.0, ATTENTION, text=True),
    }
    expected = {name: alone(ref) for name, ref in adapters.items()}
    base_image = draw(base)
    assert all(not np.array_equal(image, base_image) for image in expected.values())

    loads: list[str] = []
    slots = AdapterSlots(base, max_count=1, max_bytes=2**30, on_load=loads.append)
    # (adapter, hot swaps so far): c swapped into a's slot; b loaded afresh (conv1);
    # a swapped into b's slot (b's conv1 adapters zeroed); d (rank 2), t (text
    # encoder) and then c (into t's slot) loaded afresh.
    order = [("a", 0), ("c", 1), ("b", 1), ("a", 2), ("d", 2), ("t", 2), ("c", 2)]
    for name, swaps in order:
        with slots.use(adapters[name]):
            image = draw(base)
        assert np.array_equal(image, expected[name]), name
        assert loads.count("hot_swap") == swaps, name
        assert slots.loaded() == [adapters[name].source]
        with slots.use(None):
            assert np.array_equal(draw(base), base_image), f"the base after {name}"
    assert loads == ["fresh", "hot_swap", "fresh", "hot_swap", "fresh", "fresh", "fresh"]


def test_a_full_cache_swaps_into_the_least_recently_used_slot(tmp_path: Path) -> None:
    base = pipeline()
    refs = [
        write_adapter(base, tmp_path / str(i), 10 + i, 4, 4.0 * (i + 1), ATTENTION, text=False)
        for i in range(3)
    ]
    loads: list[str] = []
    slots = AdapterSlots(base, max_count=2, max_bytes=2**30, on_load=loads.append)
    for ref in (refs[0], refs[1], refs[0], refs[2]):  # refs[1] is the least recently used
        with slots.use(ref):
            pass
    assert loads == ["fresh", "fresh", "hot_swap"]
    assert slots.loaded() == [refs[0].source, refs[2].source]
    for ref in (refs[2], refs[0]):
        with slots.use(ref):
            image = draw(base)
        assert np.array_equal(image, alone(ref))
