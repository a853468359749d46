"""``python -m gateway``: serve the dreamsight gateway."""

from __future__ import annotations

from dreamsight_server import lifecycle
from gateway.config import parse_settings
from gateway.server import start_gateway


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
