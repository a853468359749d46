"""The only gateway module that builds UsageService / AdminService protobufs."""

from __future__ import annotations

from dreamsight.gateway.v1 import admin_pb2, usage_pb2
from google.protobuf import timestamp_pb2

from gateway.budgets import WindowUsage
from gateway.keys import Caller
from gateway.store import KeyRow
from gateway.tiers import Tier


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def api_key(row: KeyRow) -> admin_pb2.ApiKey:
    """A stored key, without its secret."""
    key = admin_pb2.ApiKey(
        key_id=row.key_id,
        tenant=row.tenant,
        tier=row.tier,
        create_time=_timestamp(row.created_at),
        description=row.description,
    )
    if row.revoked_at is not None:
        key.revoke_time.CopyFrom(_timestamp(row.revoked_at))
    return key


def usage_response(
    caller: Caller, tier: Tier, in_flight: int, training_jobs: int, windows: list[WindowUsage]
) -> usage_pb2.GetUsageResponse:
    """The caller's tier, limits and use."""
    return usage_pb2.GetUsageResponse(
        tenant=caller.tenant,
        tier=tier.name,
        max_concurrent_requests=tier.concurrent_requests,
        requests_in_flight=in_flight,
        max_concurrent_training_jobs=tier.training_jobs,
        training_jobs_running=training_jobs,
        windows=[
            usage_pb2.UsageWindow(
                name=w.window.name,
                length_seconds=w.window.seconds,
                limit_gpu_seconds=w.window.limit_gpu_seconds,
                used_gpu_seconds=w.used_gpu_seconds,
                reset_time=_timestamp(w.reset_at),
            )
            for w in windows
        ],
    )
