"""``python -m gateway``: serve the dreamsight gateway."""

from __future__ import annotations

import asyncio
import logging
import sys

from gateway.config import parse_settings
from gateway.server import run


def main(argv: list[str] | None = None) -> None:
    """Parse settings and serve until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run(parse_settings(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
