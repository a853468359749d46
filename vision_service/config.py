"""The vision service's one typed settings object.

Built in ``main()`` from flags, whose defaults come from ``DREAMSIGHT_VISION_*``
environment variables; nothing is read at import time.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dreamsight_server.images import ImageLimits
from dreamsight_server.lifecycle import ServerOptions, add_tls_arguments, tls_from_arguments

DEMO_MODEL_DIR = Path(".dreamsight/models/llava-demo")


@dataclass(frozen=True)
class VisionSettings:
    """Everything the vision service needs to start."""

    model: str = str(DEMO_MODEL_DIR)
    """A Hugging Face LLaVA directory or hub id."""
    served_model_name: str = ""
    """The name callers use; defaults to the directory's or hub id's last part."""
    build_demo_model: bool = True
    """Build the tiny demo model at ``model`` when that directory is missing."""
    max_model_len: int = 2048
    max_images_per_request: int = 4
    max_num_seqs: int = 16
    kv_cache_gib: float = 1.0
    """KV-cache size on CPU (VLLM_CPU_KVCACHE_SPACE); GPUs use gpu_memory_utilization."""
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    enforce_eager: bool = False
    default_max_tokens: int = 512
    gateway_secret: str = ""
    """When set, calls must carry it (x-dreamsight-gateway-token): only the gateway may call."""
    max_stop_strings: int = 16
    images: ImageLimits = field(default_factory=ImageLimits)
    server: ServerOptions = field(default_factory=lambda: ServerOptions(port=50052))

    @property
    def model_name(self) -> str:
        """The served model name."""
        return self.served_model_name or Path(self.model.rstrip("/")).name


def _env(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(f"DREAMSIGHT_VISION_{name}", default)


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> VisionSettings:
    """Settings from flags, defaulting to DREAMSIGHT_VISION_* variables."""
    env = os.environ if env is None else env
    d = VisionSettings()
    p = argparse.ArgumentParser(prog="python -m vision_service", description="dreamsight vision")
    p.add_argument("--model", default=_env(env, "MODEL", d.model))
    p.add_argument("--served-model-name", default=_env(env, "SERVED_MODEL_NAME", ""))
    p.add_argument(
        "--no-build-demo-model",
        dest="build_demo_model",
        action="store_false",
        default=_env(env, "BUILD_DEMO_MODEL", "1") not in ("0", "false", "no"),
    )
    p.add_argument("--max-model-len", type=int, default=int(_env(env, "MAX_MODEL_LEN", "2048")))
    p.add_argument("--max-images-per-request", type=int, default=int(_env(env, "MAX_IMAGES", "4")))
    p.add_argument("--max-num-seqs", type=int, default=int(_env(env, "MAX_NUM_SEQS", "16")))
    p.add_argument("--kv-cache-gib", type=float, default=float(_env(env, "KV_CACHE_GIB", "1")))
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=float(_env(env, "GPU_MEMORY_UTIL", "0.9"))
    )
    p.add_argument("--tensor-parallel-size", type=int, default=int(_env(env, "TP_SIZE", "1")))
    p.add_argument("--dtype", default=_env(env, "DTYPE", "auto"))
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        default=_env(env, "ENFORCE_EAGER", "0") in ("1", "true", "yes"),
    )
    p.add_argument(
        "--default-max-tokens", type=int, default=int(_env(env, "DEFAULT_MAX_TOKENS", "512"))
    )
    p.add_argument(
        "--max-image-bytes", type=int, default=int(_env(env, "MAX_IMAGE_BYTES", str(20 << 20)))
    )
    p.add_argument(
        "--max-image-pixels", type=int, default=int(_env(env, "MAX_IMAGE_PIXELS", str(4096**2)))
    )
    add_tls_arguments(p, lambda name, default: _env(env, name, default))
    p.add_argument("--host", default=_env(env, "HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env(env, "PORT", "50052")))
    p.add_argument("--metrics-port", type=int, default=int(_env(env, "METRICS_PORT", "9102")))
    p.add_argument("--grace-seconds", type=float, default=float(_env(env, "GRACE_SECONDS", "30")))
    a = p.parse_args(argv)
    images = ImageLimits(max_bytes=a.max_image_bytes, max_pixels=a.max_image_pixels)
    return VisionSettings(
        model=a.model,
        served_model_name=a.served_model_name,
        build_demo_model=a.build_demo_model,
        max_model_len=a.max_model_len,
        max_images_per_request=a.max_images_per_request,
        max_num_seqs=a.max_num_seqs,
        kv_cache_gib=a.kv_cache_gib,
        gpu_memory_utilization=a.gpu_memory_utilization,
        tensor_parallel_size=a.tensor_parallel_size,
        dtype=a.dtype,
        enforce_eager=a.enforce_eager,
        default_max_tokens=a.default_max_tokens,
        # A secret: from the environment only, never a flag (ps shows flags).
        gateway_secret=_env(env, "GATEWAY_SECRET", ""),
        images=images,
        server=ServerOptions(
            tls=tls_from_arguments(a),
            host=a.host,
            port=a.port,
            metrics_port=a.metrics_port,
            grace_s=a.grace_seconds,
            # Room for every image at its byte limit plus the text.
            max_receive_bytes=images.max_bytes * a.max_images_per_request + (4 << 20),
        ),
    )
