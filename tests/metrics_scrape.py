"""Read a service's Prometheus endpoint in tests (blocking: call via asyncio.to_thread)."""

from __future__ import annotations

import urllib.request


def metrics_text(port: int, timeout: float = 10.0) -> str:
    """The exposition text served at 127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        text: str = response.read().decode()
        return text


def metrics_samples(port: int) -> dict[str, float]:
    """Every sample by its series (``name{labels}``, as exposed), read once."""
    samples = {}
    for line in metrics_text(port).splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
