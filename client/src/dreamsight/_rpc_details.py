"""The google.rpc error details the client reads, without googleapis-common-protos.

The client depends on grpcio and protobuf only, so the four messages it
decodes from ``grpc-status-details-bin`` (Status, BadRequest, RetryInfo,
QuotaFailure) are declared here, field for field as in google/rpc/*.proto,
in a private descriptor pool that cannot clash with the real package when an
application also installs it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2
from google.protobuf.message_factory import GetMessageClass

_F = descriptor_pb2.FieldDescriptorProto


def _field(name: str, number: int, kind: int, type_name: str = "", repeated: bool = False) -> Any:
    field = _F(
        name=name,
        number=number,
        type=kind,  # type: ignore[arg-type]
        label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
    )
    if type_name:  # an empty type_name still counts as set
        field.type_name = type_name
    return field


def _build() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(any_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(duration_pb2.DESCRIPTOR.serialized_pb)
    proto = descriptor_pb2.FileDescriptorProto(
        name="dreamsight/_google_rpc_subset.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto", "google/protobuf/duration.proto"],
    )
    proto.message_type.add(
        name="Status",
        field=[
            _field("code", 1, _F.TYPE_INT32),
            _field("message", 2, _F.TYPE_STRING),
            _field("details", 3, _F.TYPE_MESSAGE, ".google.protobuf.Any", repeated=True),
        ],
    )
    violation = descriptor_pb2.DescriptorProto(
        name="FieldViolation",
        field=[_field("field", 1, _F.TYPE_STRING), _field("description", 2, _F.TYPE_STRING)],
    )
    proto.message_type.add(
        name="BadRequest",
        nested_type=[violation],
        field=[
            _field(
                "field_violations",
                1,
                _F.TYPE_MESSAGE,
                ".google.rpc.BadRequest.FieldViolation",
                repeated=True,
            )
        ],
    )
    proto.message_type.add(
        name="RetryInfo",
        field=[_field("retry_delay", 1, _F.TYPE_MESSAGE, ".google.protobuf.Duration")],
    )
    quota_violation = descriptor_pb2.DescriptorProto(
        name="Violation",
        field=[_field("subject", 1, _F.TYPE_STRING), _field("description", 2, _F.TYPE_STRING)],
    )
    proto.message_type.add(
        name="QuotaFailure",
        nested_type=[quota_violation],
        field=[
            _field(
                "violations",
                1,
                _F.TYPE_MESSAGE,
                ".google.rpc.QuotaFailure.Violation",
                repeated=True,
            )
        ],
    )
    pool.Add(proto)
    return {
        name: GetMessageClass(pool.FindMessageTypeByName(f"google.rpc.{name}"))
        for name in ("Status", "BadRequest", "RetryInfo", "QuotaFailure")
    }


_CLASSES: dict[str, Any] | None = None


def message_class(name: str) -> Any:
    """The class of google.rpc.<name> (built on first use, not at import)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _build()
    return _CLASSES[name]


def unpack(detail: Any, name: str) -> Any | None:
    """The detail as google.rpc.<name>, or None if it is another type."""
    if detail.type_url.rsplit("/", 1)[-1] != f"google.rpc.{name}":
        return None
    return message_class(name).FromString(detail.value)
