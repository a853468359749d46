"""GPU-second budgets over sliding windows, read from the durable ledger."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from dreamsight_server.errors import ResourceExhausted
from gateway.keys import Caller
from gateway.store import AsyncStore, Bill
from gateway.tiers import Tier, Window


@dataclass(frozen=True)
class WindowUsage:
    """Use of one window."""

    window: Window
    used_gpu_seconds: float
    reset_at: float
    """Over the limit: when enough use leaves the window to admit requests.
    Otherwise: when the oldest use in the window leaves it (now if none)."""


class Budgets:
    """Checks windows before admission and records metered use after."""

    def __init__(self, store: AsyncStore, cache_ttl_s: float = 1.0) -> None:
        self._store = store
        self._cache_ttl_s = cache_ttl_s
        # (tenant, window name) -> (expires at, GPU-seconds used)
        self._used: dict[tuple[str, str], tuple[float, float]] = {}
        # tenant -> GPU-seconds charged on this replica so far (charge)
        self._charged: dict[str, float] = {}

    async def _used_in(self, tenant: str, window: Window, now: float) -> float:
        key = (tenant, window.name)
        cached = self._used.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        charged = self._charged.get(tenant, 0.0)
        used = await self._store.usage_since(tenant, now - window.seconds)
        # Charged while the ledger was read: in neither the read nor the waiting
        # bills it counted (their writes go after the read).
        used += self._charged.get(tenant, 0.0) - charged
        self._used[key] = (now + self._cache_ttl_s, used)
        return used

    async def window_usage(self, tenant: str, window: Window, now: float) -> WindowUsage:
        """Use and reset time of one window (bills waiting for their write included)."""
        entries = await self._store.usage_entries(tenant, now - window.seconds)
        used = sum(e.gpu_seconds for e in entries)
        reset = now
        if entries:
            reset = entries[0].recorded_at + window.seconds
        remaining = used
        for entry in entries:
            if remaining < window.limit_gpu_seconds:
                break
            remaining -= entry.gpu_seconds
            reset = entry.recorded_at + window.seconds
        return WindowUsage(window, used, reset)

    async def check(self, caller: Caller, tier: Tier) -> None:
        """ResourceExhausted at once when any window's budget is spent."""
        now = time.time()
        for window in tier.windows:
            used = await self._used_in(caller.tenant, window, now)
            if used >= window.limit_gpu_seconds:
                usage = await self.window_usage(caller.tenant, window, now)
                reset = datetime.fromtimestamp(usage.reset_at, UTC).isoformat(timespec="seconds")
                raise ResourceExhausted(
                    f"GPU-second budget of the {window.name} window spent "
                    f"({used:.1f} of {window.limit_gpu_seconds:g}); it resets at {reset}",
                    retry_after_s=max(0.0, usage.reset_at - now),
                    quota_subject=f"tenant:{caller.tenant}",
                    quota_description=f"gpu_seconds per {window.name}: limit "
                    f"{window.limit_gpu_seconds:g}, resets at {reset}",
                )

    async def remaining(self, caller: Caller, tier: Tier) -> float | None:
        """GPU-seconds left in the tightest window; None when the tier has none."""
        now = time.time()
        left = [
            window.limit_gpu_seconds - await self._used_in(caller.tenant, window, now)
            for window in tier.windows
        ]
        return max(0.0, min(left)) if left else None

    @staticmethod
    def bill(
        ledger_id: str,
        caller: Caller,
        service: str,
        gpu_seconds: float,
        request_id: str = "",
        estimated: bool = False,
    ) -> Bill:
        """The bill of a computation, now: the ledger id is the gateway's own id of a
        call or job (the caller's request id is only traced)."""
        return Bill(
            ledger_id,
            caller.tenant,
            caller.tier,
            service,
            gpu_seconds,
            time.time(),
            request_id,
            estimated,
        )

    async def record(self, bill: Bill) -> bool:
        """Bill a computation once per ledger id and wait for its ledger row; False
        if already billed (a training job's bill, tried again, counts no more)."""
        billed = await self._store.record_usage(bill)
        if billed:  # this replica sees its own billing at once
            self._count(bill.tenant, bill.gpu_seconds)
        return billed

    def charge(self, bill: Bill) -> asyncio.Future[bool]:
        """Bill a call (its ledger id is new): it counts against the tenant's
        windows on this replica at once, and its ledger row goes in the store's
        next group write; the future says once it is written."""
        written = self._store.queue_usage(bill)
        self._charged[bill.tenant] = self._charged.get(bill.tenant, 0.0) + bill.gpu_seconds
        self._count(bill.tenant, bill.gpu_seconds)
        return written

    def _count(self, tenant: str, gpu_seconds: float) -> None:
        """Add to the tenant's cached windows (other replicas see it within the
        cache's TTL, from the ledger)."""
        for key, (expires, used) in list(self._used.items()):
            if key[0] == tenant:
                self._used[key] = (expires, used + gpu_seconds)
