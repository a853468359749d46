"""``python -m diffusion_service``: serve DiffusionService on diffusers."""

from __future__ import annotations

import asyncio
import logging
import sys

from diffusion_service.config import parse_settings
from diffusion_service.server import run
from dreamsight_server import torch_compat


def main(argv: list[str] | None = None) -> None:
    """Parse settings and serve until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    torch_compat.install()
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
