"""GPU-second accounting for one worker (DESIGN.md, "GPU-seconds").

While n requests run on a worker with g accelerators, each accrues g*dt/n.
The meter advances every running request's total whenever n changes, so the
totals always add up to g times the time the worker was busy. CPU-only
workers count their device the same way (g = 1), which keeps this testable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class GpuSecondsMeter:
    """Shares a worker's busy time among the requests running on it."""

    def __init__(self, devices: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._devices = devices
        self._clock = clock
        self._lock = threading.Lock()
        self._running: dict[str, float] = {}
        self._last = clock()
        self.busy_seconds = 0.0

    def _advance(self) -> None:
        now = self._clock()
        if self._running:
            dt = now - self._last
            share = self._devices * dt / len(self._running)
            for key in self._running:
                self._running[key] += share
            self.busy_seconds += self._devices * dt
        self._last = now

    def start(self, request_id: str) -> None:
        """Begin accruing for a request (ids must be unique while running)."""
        with self._lock:
            self._advance()
            if request_id in self._running:
                raise ValueError(f"request {request_id!r} is already metered")
            self._running[request_id] = 0.0

    def finish(self, request_id: str) -> float:
        """Stop accruing and return the request's GPU-seconds (0 if unknown)."""
        with self._lock:
            self._advance()
            return self._running.pop(request_id, 0.0)

    def spent(self, request_id: str) -> float:
        """What a running request has accrued so far (0 if unknown)."""
        with self._lock:
            self._advance()
            return self._running.get(request_id, 0.0)

    @property
    def running(self) -> int:
        """Requests accruing now."""
        with self._lock:
            return len(self._running)
