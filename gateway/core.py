"""The gateway's data plane, shared by every front end (gRPC, Ollama and OpenAI HTTP).

A call is admitted (key verified, budgets checked, a concurrency slot taken,
in that order, so a refused call holds nothing) and later finished (slot
released, metrics counted, GPU-seconds billed once per admitted call, under
the gateway's own call id). :mod:`gateway.calls` is the one lifecycle of a
metered call between the two; front ends do the transport.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc

from dreamsight_server.errors import ErrorTable, ResourceExhausted, Unauthenticated
from dreamsight_server.metadata import (
    GATEWAY_TOKEN_HEADER,
    GPU_ALLOWANCE_HEADER,
    REQUEST_ID_HEADER,
    TENANT_HEADER,
)
from gateway.admission import Lease, Limiter
from gateway.budgets import Budgets
from gateway.keys import Caller, KeyService
from gateway.metrics import GatewayMetrics
from gateway.tiers import Tier

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class Admission:
    """An admitted call, until it is finished."""

    caller: Caller
    tier: Tier
    service: str
    method: str
    request_id: str
    """The caller's x-request-id when it sent a valid one, else a fresh one:
    traced in logs and the ledger, never the ledger's key."""
    lease: Lease | None
    protocol: str = "grpc"
    """The front end that admitted the call: grpc, ollama or openai."""
    started: float = field(default_factory=time.monotonic)
    first_chunk_seen: bool = False
    finished: bool = False
    watched_job_ended: bool = False
    call_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """The gateway's own id of this call, unique per admission."""
    allowance: float | None = None
    """GPU-seconds this metered call may spend; the backend stops it there."""

    @property
    def ledger_id(self) -> str:
        """The ledger key: one row per admitted call, whatever id the caller sent
        (a caller who repeats its request id is billed for every call)."""
        return f"call:{self.call_id}"


class GatewayCore:
    """Authentication, budgets, concurrency, metering and metrics."""

    def __init__(
        self,
        keys: KeyService,
        tiers: dict[str, Tier],
        budgets: Budgets,
        limiter: Limiter,
        metrics: GatewayMetrics,
        backend_secret: str = "",
        errors: ErrorTable | None = None,
        settle_timeout_s: float = 30.0,
    ) -> None:
        self.errors = errors or ErrorTable()
        self.settle_timeout_s = settle_timeout_s
        """How long a stopped call's backend has to report what it spent."""
        self.keys = keys
        self.tiers = tiers
        self.budgets = budgets
        self.limiter = limiter
        self.metrics = metrics
        self._backend_secret = backend_secret
        # tenant -> allowances of its metered calls in flight on this replica
        self._reserved: dict[str, dict[str, float]] = {}
        self._settling: set[asyncio.Task[None]] = set()
        self._open: set[str] = set()
        """Call ids of metered calls admitted and not yet finished."""

    async def authenticate(self, authorization: str | None) -> tuple[Caller, Tier]:
        """The caller and its tier, or Unauthenticated."""
        try:
            caller = await self.keys.verify(authorization)
        except Unauthenticated:
            self.metrics.rejections.labels("unauthenticated", "none").inc()
            raise
        tier = self.tiers.get(caller.tier)
        if tier is None:  # the key's tier was removed from the tiers file
            self.metrics.rejections.labels("unknown_tier", caller.tier).inc()
            raise Unauthenticated("this key's tier no longer exists")
        return caller, tier

    async def admit(
        self,
        authorization: str | None,
        service: str,
        method: str,
        request_id: str | None,
        *,
        metered: bool,
        protocol: str = "grpc",
        budget_only: bool = False,
    ) -> Admission:
        """Admit a call; metered calls check budgets and take a slot, budget_only
        calls (a new training job) check budgets alone."""
        caller, tier = await self.authenticate(authorization)
        rid = request_id if request_id and _REQUEST_ID.match(request_id) else uuid.uuid4().hex
        lease = None
        if metered or budget_only:
            try:
                await self.budgets.check(caller, tier)
            except Exception:
                self.metrics.rejections.labels("gpu_budget", tier.name).inc()
                raise
        if metered:
            try:
                lease = await self.limiter.acquire(caller.tenant, tier.concurrent_requests)
            except Exception:
                self.metrics.rejections.labels("concurrency", tier.name).inc()
                raise
            self.metrics.queue_wait.labels(tier.name).observe(lease.waited_s)
            self.metrics.in_flight.labels(tier.name).inc()
        admission = Admission(caller, tier, service, method, rid, lease, protocol)
        if metered:
            try:
                await self._reserve(admission)
                self._open.add(admission.call_id)
            except BaseException:  # refused: leave nothing held
                self.metrics.in_flight.labels(tier.name).dec()
                await self.limiter.release(lease)  # type: ignore[arg-type]
                raise
        return admission

    async def _reserve(self, admission: Admission) -> None:
        """Give a metered call its GPU-second allowance: an equal share, among the
        tier's free slots, of what the tightest window has left after the
        allowances of the tenant's calls in flight. The allowances of calls in
        flight never add up to more than the budget left, so no window is
        overspent by more than one step of each call."""
        remaining = await self.budgets.remaining(admission.caller, admission.tier)
        if remaining is None:
            return
        tenant = admission.caller.tenant
        reserved = self._reserved.setdefault(tenant, {})
        free_slots = max(1, admission.tier.concurrent_requests - len(reserved))
        allowance = (remaining - sum(reserved.values())) / free_slots
        if allowance <= 0:
            self.metrics.rejections.labels("gpu_budget", admission.tier.name).inc()
            raise ResourceExhausted(
                "the GPU-second budget left is held by this key's calls in flight; "
                "retry when one ends",
                retry_after_s=1.0,
                quota_subject=f"tenant:{tenant}",
                quota_description="gpu_seconds: the remaining budget is reserved",
            )
        reserved[admission.call_id] = allowance
        admission.allowance = allowance

    async def settle(self, ending: Coroutine[Any, Any, None]) -> None:
        """Run a call's ending (stop, learn, bill, free) to completion even when the
        caller's handler is cancelled meanwhile; drain() waits for it at shutdown."""
        await asyncio.shield(self._settling_task(ending))

    def settle_later(self, ending: Coroutine[Any, Any, None]) -> None:
        """The same, without waiting for it: for a call whose caller already has its
        whole reply, so that its connection can carry the caller's next request
        while the bill is written."""
        self._settling_task(ending).add_done_callback(_log_failure)

    def _settling_task(self, ending: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(ending)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def drain(self, timeout_s: float) -> None:
        """Wait (up to timeout_s) until every metered call admitted has finished
        (its handler's ending may start after the server stopped), so that a
        stopping gateway bills them before it closes its channels and store."""
        deadline = time.monotonic() + timeout_s
        while (self._open or self._settling) and time.monotonic() < deadline:
            if self._settling:
                await asyncio.wait(set(self._settling), timeout=0.05)
            else:
                await asyncio.sleep(0.01)
        if self._open:
            log.warning("stopping with %d metered calls unfinished", len(self._open))

    def backend_metadata(self, admission: Admission) -> tuple[tuple[str, str], ...]:
        """What a backend hears: the vouched tenant and request id (and the call's
        GPU-second allowance), nothing of the caller's."""
        metadata = self.tenant_metadata(admission.caller.tenant, admission.request_id)
        if admission.allowance is None:
            return metadata
        return (*metadata, (GPU_ALLOWANCE_HEADER, repr(admission.allowance)))

    def tenant_metadata(self, tenant: str, request_id: str) -> tuple[tuple[str, str], ...]:
        """Backend metadata for a tenant's call."""
        return ((TENANT_HEADER, tenant), (REQUEST_ID_HEADER, request_id), *self.gateway_token())

    def gateway_token(self) -> tuple[tuple[str, str], ...]:
        """The metadata that proves a call comes from the gateway (none without a secret)."""
        return ((GATEWAY_TOKEN_HEADER, self._backend_secret),) if self._backend_secret else ()

    def first_chunk(self, admission: Admission) -> None:
        """Note the first streamed message (TTFT for Chat)."""
        if not admission.first_chunk_seen:
            admission.first_chunk_seen = True
            self.metrics.first_chunk.labels(admission.service, admission.method).observe(
                time.monotonic() - admission.started
            )

    async def finish(
        self,
        admission: Admission,
        code: grpc.StatusCode,
        gpu_seconds: float | None,
        *,
        estimated: bool = False,
    ) -> None:
        """Bill the call's GPU-seconds once, count it, release its allowance and
        slot (callers of metered calls finish only after the backend's work
        stopped), then wait for the bill's ledger row. The bill counts against
        the tenant's windows before the slot moves on, so the next call's
        allowance sees what this one spent; the slot does not wait for the
        ledger's write (a busy store would hold slots of calls long over, and
        a tenant's next requests would be refused)."""
        if admission.finished:
            return
        admission.finished = True
        tier = admission.tier.name
        written: asyncio.Future[bool] | None = None
        try:
            self.metrics.requests.labels(
                admission.service, admission.method, code.name, tier, admission.protocol
            ).inc()
            self.metrics.latency.labels(admission.service, admission.method).observe(
                time.monotonic() - admission.started
            )
            if gpu_seconds is not None and gpu_seconds > 0:
                bill = self.budgets.bill(
                    admission.ledger_id,
                    admission.caller,
                    admission.service,
                    gpu_seconds,
                    admission.request_id,
                    estimated,
                )
                written = self.budgets.charge(bill)
        finally:
            reserved = self._reserved.get(admission.caller.tenant)
            if reserved is not None:
                reserved.pop(admission.call_id, None)
                if not reserved:
                    del self._reserved[admission.caller.tenant]
            self._open.discard(admission.call_id)
            try:
                if admission.lease is not None:
                    self.metrics.in_flight.labels(tier).dec()
                    await self.limiter.release(admission.lease)
            finally:  # a failed release must not hide a failed bill
                if written is not None:
                    await self._billed(admission, written, gpu_seconds or 0.0)

    async def _billed(
        self, admission: Admission, written: asyncio.Future[bool], gpu_seconds: float
    ) -> None:
        """Wait for the bill's ledger row; count it, or say loudly what was not billed."""
        try:
            billed = await written
        except Exception:  # the call is over either way
            self.metrics.billing_failures.inc()
            log.exception(
                "could not bill %s (%s, %.6f GPU-s)",
                admission.ledger_id,
                admission.caller.tenant,
                gpu_seconds,
            )
            return
        if billed:
            self.metrics.gpu_seconds.labels(admission.tier.name, admission.service).inc(gpu_seconds)
        else:
            log.info("request %s was already billed", admission.ledger_id)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("settling a call failed", exc_info=task.exception())
