"""Session-wide fixtures: the demo models are built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# vLLM on CPU needs an explicit KV-cache size (GiB); keep it small here.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo LLaVA-Llama-3, built once."""
    from vision_service import demo_model

    return demo_model.build(tmp_path_factory.mktemp("models") / "llava-demo")


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo Stable Diffusion pipeline, built once."""
    from diffusion_service import demo_model

    return demo_model.build(tmp_path_factory.mktemp("models") / "sd-demo")
