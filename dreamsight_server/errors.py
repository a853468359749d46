"""Typed domain errors and the one table that maps them to gRPC statuses.

Engines and validators raise these; they never see gRPC. The error-mapping
interceptor (``dreamsight_server.interceptors``) applies a process's
:class:`ErrorTable` in one place. Anything that is not a
:class:`DreamsightError` becomes INTERNAL with a generic text and the request
id; the exception itself goes only to the log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc


class DreamsightError(Exception):
    """Base class of errors whose message is safe to show the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DreamsightError):
    """The request is malformed; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class NotFound(DreamsightError):
    """The named model, job or key does not exist (for this caller)."""


class PermissionDenied(DreamsightError):
    """The caller may not touch this resource."""


class Unauthenticated(DreamsightError):
    """The caller's credentials are missing or wrong."""


class ResourceExhausted(DreamsightError):
    """A queue, quota or limit is full."""

    def __init__(
        self,
        message: str,
        retry_after_s: float | None = None,
        quota_subject: str = "",
        quota_description: str = "",
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.quota_subject = quota_subject
        self.quota_description = quota_description


class Unavailable(DreamsightError):
    """The service is loading, shutting down or its engine is down."""


class FailedPrecondition(DreamsightError):
    """The resource is in a state that does not allow the operation."""


class DeadlineExceeded(DreamsightError):
    """The work did not finish before its deadline."""


class Cancelled(DreamsightError):
    """The work was cancelled."""


DEFAULT_TABLE: Mapping[type[DreamsightError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
}


@dataclass(frozen=True)
class ErrorTable:
    """Maps domain error classes to status codes; the most specific class wins."""

    codes: Mapping[type[DreamsightError], grpc.StatusCode] = field(
        default_factory=lambda: dict(DEFAULT_TABLE)
    )

    def code_for(self, error: BaseException) -> grpc.StatusCode:
        """The status for an error; INTERNAL for anything unmapped."""
        if isinstance(error, NotImplementedError):  # generated servicer base classes
            return grpc.StatusCode.UNIMPLEMENTED
        for cls in type(error).__mro__:
            if cls in self.codes:
                return self.codes[cls]
        return grpc.StatusCode.INTERNAL
