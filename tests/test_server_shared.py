"""The shared server package: error table, interceptor, images, meter, tenancy."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from dreamsight_server import errors
from dreamsight_server.gpu_seconds import GpuSecondsMeter
from dreamsight_server.images import ImageLimits, decode_image
from dreamsight_server.interceptors import ErrorMappingInterceptor, current_request_id
from dreamsight_server.tenancy import (
    GATEWAY_TOKEN_HEADER,
    TENANT_HEADER,
    tenant_from_metadata,
)

ROWS: list[tuple[Exception, grpc.StatusCode]] = [
    (errors.InvalidArgument("options.top_p", "too big"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound("no such model"), grpc.StatusCode.NOT_FOUND),
    (errors.PermissionDenied("not yours"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated("who are you"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.ResourceExhausted("queue full", retry_after_s=1.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable("loading"), grpc.StatusCode.UNAVAILABLE),
    (errors.FailedPrecondition("job ended"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.DeadlineExceeded("too slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Cancelled("stopped"), grpc.StatusCode.CANCELLED),
]


def test_every_domain_error_has_a_row() -> None:
    table = errors.ErrorTable()
    mapped = {type(error) for error, _ in ROWS}
    assert mapped == set(errors.DEFAULT_TABLE)
    for error, code in ROWS:
        assert table.code_for(error) is code
    assert table.code_for(KeyError("x")) is grpc.StatusCode.INTERNAL


class _Raiser:
    """A real aio server whose methods raise whatever the test sets."""

    def __init__(self) -> None:
        self.error: BaseException = RuntimeError()
        self.seen_request_id = ""

    async def unary(self, request: bytes, context: Any) -> bytes:
        self.seen_request_id = current_request_id()
        raise self.error

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        raise self.error


@pytest.fixture
async def raiser() -> AsyncIterator[tuple[_Raiser, grpc.aio.Channel]]:
    impl = _Raiser()
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    handler = grpc.method_handlers_generic_handler(
        "test.Raiser",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(impl.unary),
            "Stream": grpc.unary_stream_rpc_method_handler(impl.stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield impl, channel
    await channel.close(grace=None)
    await server.stop(0)


def _unary(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary("/test.Raiser/Unary", None, None)


def _stream(channel: grpc.aio.Channel) -> Any:
    return channel.unary_stream("/test.Raiser/Stream", None, None)


@pytest.mark.parametrize(("error", "code"), ROWS, ids=[c.name for _, c in ROWS])
async def test_interceptor_maps_each_row_on_unary_and_stream(
    raiser: tuple[_Raiser, grpc.aio.Channel], error: Exception, code: grpc.StatusCode
) -> None:
    impl, channel = raiser
    impl.error = error
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _unary(channel)(b"")
    assert caught.value.code() is code
    assert caught.value.details() == str(error)
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for item in _stream(channel)(b""):
            assert item == b"first"
    assert streamed.value.code() is code


async def test_invalid_argument_carries_bad_request_details(
    raiser: tuple[_Raiser, grpc.aio.Channel],
) -> None:
    impl, channel = raiser
    impl.error = errors.InvalidArgument("messages[0].images[1]", "cannot decode image")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _unary(channel)(b"")
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "messages[0].images[1]"


async def test_resource_exhausted_carries_retry_info(
    raiser: tuple[_Raiser, grpc.aio.Channel],
) -> None:
    impl, channel = raiser
    impl.error = errors.ResourceExhausted("busy", retry_after_s=2.5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _unary(channel)(b"")
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 2500


async def test_internal_never_leaks_exception_text(
    raiser: tuple[_Raiser, grpc.aio.Channel],
) -> None:
    impl, channel = raiser
    impl.error = RuntimeError("secret path /etc/passwd")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _unary(channel)(b"", metadata=(("x-request-id", "req-42"),))
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert caught.value.details() == "internal error (request id req-42)"
    assert impl.seen_request_id == "req-42"


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=1_000_000, max_side=4096)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("empty", b"", "empty"),
        ("garbage", b"hello world", "cannot decode"),
        ("truncated png", _encode(Image.new("RGB", (50, 50), "red"), "PNG")[:60], "cannot decode"),
        (
            "truncated jpeg",
            _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:300],
            "cannot decode",
        ),
        ("too many bytes", b"\x89PNG" + b"\0" * 2_000_001, "bytes, over the limit"),
        # A tiny file that claims 20000x20000 pixels: rejected from the header.
        ("decompression bomb", _encode(Image.new("1", (20000, 20000)), "PNG"), "pixels"),
        ("1x100000", _encode(Image.new("L", (1, 100000)), "PNG"), "each side"),
    ],
)
def test_hostile_images_are_rejected_with_the_field(name: str, data: bytes, message: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        decode_image(data, LIMITS, "messages[0].images[0]")
    assert caught.value.field == "messages[0].images[0]"
    assert message in caught.value.description


@pytest.mark.parametrize(
    "image",
    [
        Image.new("CMYK", (20, 10), (0, 255, 0, 0)),
        Image.new("I;16", (20, 10), 40000),
        Image.new("RGBA", (20, 10), (255, 0, 0, 128)),
        Image.new("P", (20, 10)),
    ],
    ids=["cmyk", "16-bit", "rgba", "palette"],
)
def test_unusual_modes_become_rgb(image: Image.Image) -> None:
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    decoded = decode_image(_encode(image, fmt), LIMITS, "img")
    assert decoded.mode == "RGB" and decoded.size == (20, 10)


def test_animated_gif_keeps_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(out.getvalue(), LIMITS, "img")
    red, _, _ = decoded.getpixel((0, 0))  # type: ignore[misc]
    assert red > 200


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_meter_shares_busy_time_among_running_requests() -> None:
    clock = FakeClock()
    meter = GpuSecondsMeter(devices=2.0, clock=clock)
    meter.start("a")
    clock.now = 1.0  # a alone for 1 s: 2 GPU-s
    meter.start("b")
    clock.now = 3.0  # a and b for 2 s: 2 GPU-s each
    assert meter.finish("a") == pytest.approx(4.0)
    clock.now = 4.0  # b alone for 1 s: 2 GPU-s
    assert meter.finish("b") == pytest.approx(4.0)
    clock.now = 10.0  # idle time is nobody's
    assert meter.busy_seconds == pytest.approx(8.0)
    assert meter.finish("unknown") == 0.0
    assert meter.running == 0


def test_meter_rejects_a_duplicate_running_id() -> None:
    meter = GpuSecondsMeter(clock=FakeClock())
    meter.start("a")
    with pytest.raises(ValueError, match="already metered"):
        meter.start("a")


def test_tenant_requires_the_gateway_token_when_configured() -> None:
    good = [(TENANT_HEADER, "acme"), (GATEWAY_TOKEN_HEADER, "s3cret")]
    assert tenant_from_metadata(good, "s3cret") == "acme"
    with pytest.raises(errors.Unauthenticated):
        tenant_from_metadata([(TENANT_HEADER, "acme")], "s3cret")
    with pytest.raises(errors.Unauthenticated):
        tenant_from_metadata([(TENANT_HEADER, "acme"), (GATEWAY_TOKEN_HEADER, "nope")], "s3cret")
    assert tenant_from_metadata([(TENANT_HEADER, "acme")], None) == "acme"
    assert tenant_from_metadata([], None) == "local"
    with pytest.raises(errors.InvalidArgument):
        tenant_from_metadata([(TENANT_HEADER, "x" * 65)], None)


def test_no_server_path_reaches_a_tenant(tmp_path: Any) -> None:
    from dreamsight_server.tenancy import public_source

    assert public_source(str(tmp_path)) == ""
    assert public_source("/models/llava-demo") == "", "absent here, still a path"
    assert public_source("./models/x") == "" and public_source("~/m") == ""
    assert public_source("xtuner/llava-llama-3-8b-v1_1-transformers") == (
        "xtuner/llava-llama-3-8b-v1_1-transformers"
    )
    assert public_source("") == ""
