"""Exceptions the client raises: one class per gRPC status, details decoded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from dreamsight._rpc_details import message_class, unpack


@dataclass(frozen=True)
class QuotaViolation:
    """Which quota a request ran into (from google.rpc.QuotaFailure)."""

    subject: str
    description: str


class DreamsightError(Exception):
    """Base class of every error the client raises."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, request_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class InvalidRequest(DreamsightError):
    """INVALID_ARGUMENT; ``field`` names the offending request field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, field: str = "", request_id: str = "") -> None:
        super().__init__(message, request_id=request_id)
        self.field = field


class AuthenticationError(DreamsightError):
    """UNAUTHENTICATED: no API key, or an unknown or revoked one."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DreamsightError):
    """PERMISSION_DENIED: an admin-only call, or deleting a shared base model
    (another tenant's job or model is NOT_FOUND, like a missing one)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(DreamsightError):
    """NOT_FOUND: no such model, job or key."""

    code = grpc.StatusCode.NOT_FOUND


class RateLimited(DreamsightError):
    """RESOURCE_EXHAUSTED: a concurrency or GPU-second limit.

    ``retry_after`` (seconds) is set when the server said when to retry;
    ``quota`` says which limit.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        quota: tuple[QuotaViolation, ...] = (),
        request_id: str = "",
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.retry_after = retry_after
        self.quota = quota


class Unavailable(DreamsightError):
    """UNAVAILABLE: the service is down, loading or restarting; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(DreamsightError):
    """DEADLINE_EXCEEDED: the call took longer than its timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(DreamsightError):
    """CANCELLED: the call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class FailedPrecondition(DreamsightError):
    """FAILED_PRECONDITION: the resource's state does not allow this."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(DreamsightError):
    """UNIMPLEMENTED: the server does not offer this call."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(DreamsightError):
    """INTERNAL or UNKNOWN: a server bug; the message carries the request id."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[DreamsightError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        AuthenticationError,
        PermissionDenied,
        NotFound,
        RateLimited,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        FailedPrecondition,
        Unimplemented,
        InternalError,
    )
}


def _details(error: Any) -> list[Any]:
    trailers: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return list(message_class("Status").FromString(value).details)
    return []


def from_rpc_error(error: grpc.RpcError, request_id: str = "") -> DreamsightError:
    """The typed exception for a failed call."""
    failed: Any = error
    code: grpc.StatusCode = failed.code()
    message: str = failed.details() or code.name
    details = _details(error)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        field = message.split(":", 1)[0] if ":" in message else ""
        for detail in details:
            bad = unpack(detail, "BadRequest")
            if bad is not None and bad.field_violations:
                field = bad.field_violations[0].field
        return InvalidRequest(message, field=field, request_id=request_id)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after = None
        quota: tuple[QuotaViolation, ...] = ()
        for detail in details:
            retry, failure = unpack(detail, "RetryInfo"), unpack(detail, "QuotaFailure")
            if retry is not None:
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
            if failure is not None:
                quota = tuple(QuotaViolation(v.subject, v.description) for v in failure.violations)
        return RateLimited(message, retry_after=retry_after, quota=quota, request_id=request_id)
    cls = _BY_CODE.get(code, InternalError)
    return cls(message, request_id=request_id)
