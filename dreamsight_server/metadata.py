"""Names of the metadata keys that pass between gateway and backends."""

from __future__ import annotations

TENANT_HEADER = "x-dreamsight-tenant"
"""The tenant the gateway vouches for."""
GATEWAY_TOKEN_HEADER = "x-dreamsight-gateway-token"
"""The secret shared by gateway and backends, proving the tenant header."""
REQUEST_ID_HEADER = "x-request-id"
"""The request id: the ledger key and the log correlation id."""
GPU_SECONDS_TRAILER = "x-dreamsight-gpu-seconds"
"""Trailer in which a backend reports a call's GPU-seconds to the gateway."""

DEVICE_SHARE_HEADER = "x-dreamsight-device-share"
"""Initial metadata of a settled call: the share of a device the call may hold
(the gateway's estimate, devices x elapsed, when the backend dies mid-call)."""
LANES_HEADER = "x-dreamsight-lanes"
"""Initial metadata a backend sends as soon as it takes a lane (see
:mod:`dreamsight_server.lanes`): the gateway writes nothing on a lane before
it, since a replica without lanes ends the stream at once, and gRPC may then
report a write racing that end as "Internal error from Core" instead of
the replica's UNIMPLEMENTED. Its value is the lanes version the replica reads
(:data:`LANES_VERSION`; "1" before requests were batched)."""
LANES_VERSION = 2
"""The lanes version this code reads: 2, a request may carry the requests
queued behind it (``LaneRequest.batch``)."""
GPU_ALLOWANCE_HEADER = "x-dreamsight-gpu-allowance"
"""GPU-seconds a call may spend (from the tenant's remaining budget), set by the gateway."""


def gpu_seconds_trailer(gpu_seconds: float) -> tuple[tuple[str, str]]:
    """Trailing metadata reporting a call's GPU-seconds."""
    return ((GPU_SECONDS_TRAILER, repr(float(gpu_seconds))),)


MAX_TRAINING_JOBS_HEADER = "x-dreamsight-max-training-jobs"
"""The tenant tier's limit on queued plus running training jobs (an integer),
set by the gateway; absent means no limit."""
