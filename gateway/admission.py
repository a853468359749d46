"""Per-tenant concurrency: a limit, a short bounded queue, and leases.

:class:`LocalLimiter` keeps the state in the gateway process (one replica).
:class:`RedisLimiter` keeps it in Redis as leases that expire, so several
replicas enforce one limit and a killed replica's slots come back after
``lease_ttl_s``. Both hand out :class:`Lease` objects that must be released
on every ending; the proxy does that in ``finally``.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from dreamsight_server.errors import ResourceExhausted


@dataclass
class Lease:
    """One held slot."""

    tenant: str
    lease_id: str = field(default_factory=lambda: secrets.token_hex(8))
    waited_s: float = 0.0
    released: bool = False


class Limiter(Protocol):
    """What the proxy needs from a concurrency limiter."""

    async def acquire(self, tenant: str, limit: int) -> Lease:
        """A slot, after waiting in the tenant's queue if needed; or ResourceExhausted."""
        ...

    async def release(self, lease: Lease) -> None:
        """Give the slot back (idempotent)."""
        ...

    async def in_flight(self, tenant: str) -> int:
        """Slots the tenant holds now."""
        ...

    async def close(self) -> None:
        """Stop background work."""
        ...


def _rejected(tenant: str, limit: int, retry_after_s: float, why: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"too many concurrent requests for this key's tier (limit {limit}): {why}",
        retry_after_s=retry_after_s,
        quota_subject=f"tenant:{tenant}",
        quota_description=f"concurrent requests: limit {limit}",
    )


@dataclass
class _TenantState:
    running: int = 0
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)


class LocalLimiter:
    """Concurrency limits held in this process."""

    def __init__(self, queue_length: int, queue_wait_s: float) -> None:
        self._queue_length = queue_length
        self._queue_wait_s = queue_wait_s
        self._tenants: dict[str, _TenantState] = collections.defaultdict(_TenantState)

    async def acquire(self, tenant: str, limit: int) -> Lease:
        state = self._tenants[tenant]
        if state.running < limit and not state.waiters:
            state.running += 1
            return Lease(tenant)
        if len(state.waiters) >= self._queue_length:
            raise _rejected(tenant, limit, 1.0, "queue full")
        start = time.monotonic()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self._queue_wait_s)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return Lease(tenant, waited_s=time.monotonic() - start)  # granted just in time
            state.waiters.remove(waiter)
            waiter.cancel()
            raise _rejected(tenant, limit, self._queue_wait_s, "waited too long") from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._hand_over(tenant)  # granted, but the caller left: pass it on
            else:
                state.waiters.remove(waiter)
                waiter.cancel()
            raise
        return Lease(tenant, waited_s=time.monotonic() - start)

    def _hand_over(self, tenant: str) -> None:
        state = self._tenants[tenant]
        while state.waiters:
            waiter = state.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; running unchanged
                return
        state.running -= 1
        if state.running == 0 and not state.waiters:
            del self._tenants[tenant]

    async def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        self._hand_over(lease.tenant)

    async def in_flight(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.running if state else 0

    async def close(self) -> None:
        return None


# Drop expired leases, then take one if there is room. KEYS[1]: the tenant's
# lease set; ARGV: now, expiry, limit, lease id.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  redis.call('EXPIRE', KEYS[1], 86400)
  return 1
end
return 0
"""


class RedisLimiter:
    """Concurrency limits shared by gateway replicas through Redis leases.

    A lease is a member of the tenant's sorted set scored by its expiry; the
    holder refreshes it every third of the TTL. Waiting requests poll with a
    short backoff; a per-tenant counter bounds the queue across replicas.
    """

    def __init__(self, url: str, queue_length: int, queue_wait_s: float, lease_ttl_s: float):
        import redis.asyncio as redis

        self._redis: Any = redis.from_url(url)
        self._queue_length = queue_length
        self._queue_wait_s = queue_wait_s
        self._ttl = lease_ttl_s
        self._acquire_script = self._redis.register_script(_ACQUIRE)
        self._held: dict[str, Lease] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    @staticmethod
    def _key(tenant: str) -> str:
        return f"dreamsight:slots:{tenant}"

    async def _try(self, lease: Lease, limit: int) -> bool:
        now = time.time()
        got = await self._acquire_script(
            keys=[self._key(lease.tenant)], args=[now, now + self._ttl, limit, lease.lease_id]
        )
        return bool(got)

    async def acquire(self, tenant: str, limit: int) -> Lease:
        lease = Lease(tenant)
        if await self._try(lease, limit):
            return self._hold(lease)
        queue_key = f"dreamsight:queue:{tenant}"
        waiting = await self._redis.incr(queue_key)
        await self._redis.expire(queue_key, int(self._queue_wait_s) + 60)
        try:
            if waiting > self._queue_length:
                raise _rejected(tenant, limit, 1.0, "queue full")
            start = time.monotonic()
            delay = 0.005
            while time.monotonic() - start < self._queue_wait_s:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
                if await self._try(lease, limit):
                    lease.waited_s = time.monotonic() - start
                    return self._hold(lease)
            raise _rejected(tenant, limit, self._queue_wait_s, "waited too long")
        finally:
            await self._redis.decr(queue_key)

    def _hold(self, lease: Lease) -> Lease:
        self._held[lease.lease_id] = lease
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._refresh_forever())
        return lease

    async def _refresh_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self._ttl / 3)
            expiry = time.time() + self._ttl
            for lease in list(self._held.values()):
                await self._redis.zadd(self._key(lease.tenant), {lease.lease_id: expiry}, xx=True)

    async def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        self._held.pop(lease.lease_id, None)
        await self._redis.zrem(self._key(lease.tenant), lease.lease_id)

    async def in_flight(self, tenant: str) -> int:
        await self._redis.zremrangebyscore(self._key(tenant), "-inf", time.time())
        return int(await self._redis.zcard(self._key(tenant)))

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await self._redis.aclose()
