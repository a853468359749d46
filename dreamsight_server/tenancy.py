"""The tenant of a call, as the gateway vouches for it.

The gateway authenticates callers and sets ``x-dreamsight-tenant`` on every
call it forwards, together with ``x-dreamsight-gateway-token``, a secret
shared by the gateway and the backends (a Kubernetes Secret; ``dreamsight up``
makes a fresh one at every start). Backends trust the tenant only when the
token matches (compared in constant time); without a configured secret they
trust the header as is. mTLS between gateway and backends can replace the token.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from dreamsight_server.errors import InvalidArgument, Unauthenticated
from dreamsight_server.metadata import GATEWAY_TOKEN_HEADER, TENANT_HEADER

__all__ = [
    "GATEWAY_TOKEN_HEADER",
    "TENANT_HEADER",
    "check_gateway_token",
    "public_source",
    "tenant_from_metadata",
]

DEFAULT_TENANT = "local"
MAX_TENANT_LENGTH = 64


def _values(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    return {key: value for key, value in (metadata or ()) if isinstance(value, str)}


def check_gateway_token(
    metadata: Iterable[tuple[str, str | bytes]] | None, gateway_secret: str | None
) -> None:
    """Raise Unauthenticated unless the call carries the gateway's token (no
    configured secret: every caller passes)."""
    _check_token(_values(metadata), gateway_secret)


def _check_token(values: dict[str, str], gateway_secret: str | None) -> None:
    if gateway_secret:
        token = values.get(GATEWAY_TOKEN_HEADER, "")
        if not hmac.compare_digest(token.encode(), gateway_secret.encode()):
            raise Unauthenticated("calls must come through the gateway")


def tenant_from_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None, gateway_secret: str | None
) -> str:
    """The calling tenant; raises when the gateway token is missing or wrong."""
    values = _values(metadata)
    _check_token(values, gateway_secret)
    tenant = values.get(TENANT_HEADER, DEFAULT_TENANT)
    if not tenant or len(tenant) > MAX_TENANT_LENGTH or not tenant.isprintable():
        raise InvalidArgument(TENANT_HEADER, f"must be 1 to {MAX_TENANT_LENGTH} printable chars")
    return tenant


def public_source(source: str) -> str:
    """What tenants may see of where a model came from: a hub id as it is, and
    nothing for a local directory (no tenant-visible field shows a server path)."""
    if not source or source.startswith(("/", ".", "~")) or Path(source).exists():
        return ""
    return source
