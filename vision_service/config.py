"""The vision service's one typed settings object.

Each setting is declared once below (default, help, limits); ``--help``
lists them with their ``DREAMSIGHT_VISION_*`` variables. Built in ``main()``;
nothing is read at import time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from dreamsight_server.images import ImageLimits
from dreamsight_server.lifecycle import ServerOptions
from dreamsight_server.settings import (
    SettingsError,
    gateway_secret_setting,
    group,
    parse,
    setting,
    trust_any_caller_setting,
)


@dataclass(frozen=True)
class VisionSettings:
    """Everything the vision service needs to start."""

    ENV_PREFIX: ClassVar[str] = "DREAMSIGHT_VISION_"

    model: str = setting("", "a Hugging Face LLaVA directory or hub id (required)")
    served_model_name: str = setting(
        "", "the name callers use; empty: the directory's or hub id's last part"
    )
    max_model_len: int = setting(2048, "context length in tokens (prompt and reply)", minimum=1)
    max_images_per_request: int = setting(
        4, "images one chat may carry", env="MAX_IMAGES", minimum=0
    )
    max_num_seqs: int = setting(16, "sequences vLLM batches at once", minimum=1)
    kv_cache_gib: float = setting(
        1.0, "KV-cache size on CPU in GiB (GPUs use --gpu-memory-utilization)", minimum=0
    )
    gpu_memory_utilization: float = setting(
        0.9, "share of GPU memory vLLM may take", env="GPU_MEMORY_UTIL", minimum=0
    )
    tensor_parallel_size: int = setting(1, "GPUs one model spans", env="TP_SIZE", minimum=1)
    dtype: str = setting("auto", "weights' dtype: auto, float16, bfloat16, float32")
    quantization: str = setting("", "vLLM quantization method, e.g. awq, gptq, fp8; empty: none")
    kv_cache_dtype: str = setting("auto", "KV-cache dtype: auto, fp8, fp8_e4m3, fp8_e5m2")
    enforce_eager: bool = setting(False, "run vLLM eagerly (no torch.compile or CUDA graphs)")
    default_max_tokens: int = setting(512, "reply length when a request sets none", minimum=1)
    compact_json: bool = setting(
        False,
        "structured replies (JSON formats, tool calls) without optional whitespace: the same "
        "JSON in fewer tokens (vLLM's disable_any_whitespace; uses the xgrammar backend, "
        "without vLLM's fallback to guidance)",
    )
    tool_call_parser: str = setting(
        "",
        "vLLM's tool call parser for the model's family (e.g. llama3_json for Llama 3.1+, "
        "hermes, mistral), which lets tool_choice auto call tools; empty: auto leaves tools "
        "unused (required and named tool choices work on every model)",
    )
    max_prompt_chars: int = setting(
        0,
        "longest prompt text in characters, refused before it is tokenized; 0: 16 per token "
        "of --max-model-len",
        minimum=0,
    )
    place_off_workers: bool = setting(
        True,
        "on a CPU-only machine, once the engine is up, run this service and vLLM's engine "
        "core on the cores no CPU worker is bound to, the engine core beside the worker "
        "while the engine is busy where one core is left (see vision_service/placement.py)",
    )
    max_stop_strings: int = 16
    gateway_secret: str = gateway_secret_setting()
    trust_any_caller: bool = trust_any_caller_setting()
    images: ImageLimits = group(ImageLimits)
    server: ServerOptions = group(lambda: ServerOptions(port=50052, metrics_port=9102))

    @property
    def prompt_char_limit(self) -> int:
        """The longest prompt text, in characters, that is worth tokenizing."""
        return self.max_prompt_chars or 16 * self.max_model_len

    @property
    def model_name(self) -> str:
        """The served model name."""
        return self.served_model_name or Path(self.model.rstrip("/")).name


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> VisionSettings:
    """Settings from flags, then DREAMSIGHT_VISION_* variables, then the defaults."""
    settings = parse(
        VisionSettings,
        argv,
        env,
        "python -m vision_service",
        "dreamsight vision: chat about images, served by vLLM",
    )
    if not settings.model:
        raise SettingsError("--model: a LLaVA model directory or hub id is required")
    # Room for every image at its byte limit plus the text.
    receive = settings.images.max_bytes * max(1, settings.max_images_per_request) + (4 << 20)
    return replace(settings, server=replace(settings.server, max_receive_bytes=receive))
