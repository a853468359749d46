"""``python -m gateway``: serve the dreamsight gateway."""

from __future__ import annotations

from dreamsight_server import grpc_core

grpc_core.configure()  # before anything below imports grpc

from dreamsight_server import lifecycle  # noqa: E402
from gateway.config import parse_settings  # noqa: E402
from gateway.server import start_gateway  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Parse settings and serve until SIGTERM."""
    lifecycle.main(
        "gateway",
        lambda: parse_settings(argv),
        start_gateway,
        use_uvloop=lambda settings: settings.event_loop == "uvloop",
    )


if __name__ == "__main__":
    main()
