"""``python -m vision_service``: serve VisionService on vLLM."""

from __future__ import annotations

from dreamsight_server import grpc_core

grpc_core.configure()  # before anything below imports grpc

from dreamsight_server import lifecycle, torch_compat  # noqa: E402
from dreamsight_server.settings import only_the_gateway  # noqa: E402
from vision_service.config import parse_settings  # noqa: E402
from vision_service.server import start_service  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Parse settings and serve until SIGTERM."""
    lifecycle.main(
        "vision",
        lambda: only_the_gateway(parse_settings(argv)),
        lambda settings: start_service(settings, own_process=True),
        prepare=lambda _: torch_compat.install(),
    )


if __name__ == "__main__":
    main()
