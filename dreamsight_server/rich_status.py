"""Builds google.rpc.Status with details for a mapped domain error."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from dreamsight_server.errors import DreamsightError, InvalidArgument, ResourceExhausted


def to_status(code: grpc.StatusCode, message: str, error: DreamsightError | None) -> grpc.Status:
    """A grpc.Status with BadRequest / RetryInfo details where they apply."""
    details: list[any_pb2.Any] = []
    if isinstance(error, InvalidArgument):
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=error.field, description=error.description
                )
            ]
        )
        details.append(_pack(bad))
    if isinstance(error, ResourceExhausted) and error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if isinstance(error, ResourceExhausted) and error.quota_subject:
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=error.quota_subject, description=error.quota_description
        )
        details.append(_pack(error_details_pb2.QuotaFailure(violations=[violation])))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(status)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed
