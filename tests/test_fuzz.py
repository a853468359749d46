"""Hypothesis against every public RPC: random and boundary messages (empty,
huge, NaN, negative, unicode, junk inside bytes) never get INTERNAL, never
crash a service, and always get a clear status.

The servers run on the test session's event loop; hypothesis drives them from
a worker thread with blocking stubs, so each example is a real gRPC call.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from dreamsight.common.v1 import common_pb2
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from dreamsight.gateway.v1 import admin_pb2, admin_pb2_grpc, usage_pb2, usage_pb2_grpc
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dreamsight_server.lifecycle import ServerOptions
from gateway.config import GatewaySettings
from gateway.server import Gateway, start_gateway
from tests.conftest import VisionHandle
from tests.gateway_helpers import ADMIN_TOKEN, new_key

pytestmark = pytest.mark.slow

# Statuses a caller may see for bad or unlucky input; never INTERNAL or UNKNOWN.
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def _png(size: tuple[int, int] = (16, 12)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, format="PNG")
    return out.getvalue()


floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, 2.0001, math.nan, math.inf, -math.inf, 1e30]),
)
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "é" * 300, "🙂" * 50, "word " * 2000]),
)
image_bytes = st.one_of(
    st.binary(max_size=64),
    st.just(_png()),
    st.just(_png()[:30]),
    st.just(b"GIF89a" + b"\xff" * 40),
)
images = st.builds(common_pb2.Image, data=image_bytes, mime_type=st.sampled_from(["", "x/y"]))
messages = st.builds(
    vision_pb2.Message,
    role=st.integers(min_value=0, max_value=5),
    content=texts,
    images=st.lists(images, max_size=3),
)


@st.composite
def chat_options(draw: st.DrawFn) -> vision_pb2.ChatOptions:
    options = vision_pb2.ChatOptions()
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):  # fmt: skip
        if draw(st.booleans()):
            setattr(options, name, draw(floats))
    if draw(st.booleans()):
        options.max_tokens = draw(st.one_of(st.integers(0, 6), st.just(2**32 - 1)))
    else:
        options.max_tokens = 4  # keep generations short
    if draw(st.booleans()):
        options.top_k = draw(st.integers(-(2**31), 2**31 - 1))
    if draw(st.booleans()):
        options.seed = draw(st.integers(-(2**63), 2**63 - 1))
    options.stop.extend(draw(st.lists(texts, max_size=20)))
    # Enum values past the defined ones arrive as open enums: the service must cope.
    options.response_format.type = draw(st.integers(0, 6))  # type: ignore[assignment]
    options.response_format.json_schema = draw(
        st.sampled_from(["", "{", "[]", '{"type": "object"}', '{"type": "nonsense"}'])
    )
    return options


chat_requests = st.builds(
    vision_pb2.ChatRequest,
    model=st.sampled_from(["", "llava-demo", "nope", "../etc/passwd"]),
    messages=st.lists(messages, max_size=3),
    options=chat_options(),
    request_id=st.sampled_from(["", "x" * 200, "r-1"]),
)

generate_requests = st.builds(
    diffusion_pb2.GenerateRequest,
    model=st.sampled_from(["", "sd-demo", "nope", "../../x", "a/b"]),
    prompt=texts,
    negative_prompt=texts,
    width=st.one_of(st.sampled_from([0, 1, 7, 8, 32, 63, 64, 4096, 2**32 - 1])),
    height=st.one_of(st.sampled_from([0, 8, 64, 65, 100000])),
    steps=st.sampled_from([0, 1, 2, 3, 10**6]),
    guidance_scale=floats,
    scheduler=st.sampled_from(["", "ddim", "euler", "nope", "PNDM", "\x00"]),
    seed=st.integers(-(2**63), 2**63 - 1),
    num_images=st.sampled_from([0, 1, 2, 1000]),
)


def _check(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, bytes | str):
            for _ in result:
                pass
        return grpc.StatusCode.OK
    except grpc.RpcError as failed:
        error: Any = failed
        code: grpc.StatusCode = error.code()
        details: str = error.details() or ""
        assert code in CLEAR, f"{code.name}: {details}"
        assert details, "every refusal says why"
        return code


@pytest.fixture(scope="module")
async def fuzz_stack(
    tmp_path_factory: pytest.TempPathFactory, vision: VisionHandle, diffusion_backend: Any
) -> AsyncIterator[tuple[Gateway, str, int]]:
    diffusion = diffusion_backend
    gateway = await start_gateway(
        GatewaySettings(
            vision_target=f"127.0.0.1:{vision.service.port}",
            diffusion_target=f"127.0.0.1:{diffusion.port}",
            database=str(tmp_path_factory.mktemp("fuzz") / "gw.sqlite3"),
            admin_token=ADMIN_TOKEN,
            http_port=None,
            server=ServerOptions(metrics_port=None, grace_s=1.0),
        )
    )
    key = await new_key(gateway, "fuzzer", "max")
    yield gateway, key, diffusion.port
    await gateway.stop(0)


async def test_fuzz_chat_on_the_vision_service(vision: VisionHandle) -> None:
    def run() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{vision.service.port}") as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)

            @FUZZ
            @given(chat_requests)
            def chat(request: vision_pb2.ChatRequest) -> None:
                _check(lambda: stub.Chat(request, timeout=60))

            @FUZZ
            @given(st.text(max_size=300))
            def get_model(name: str) -> None:
                _check(lambda: stub.GetModel(vision_pb2.GetModelRequest(name=name), timeout=10))

            chat()
            get_model()
            healthy = stub.ListModels(vision_pb2.ListModelsRequest(), timeout=10)
            assert healthy.models[0].name == "llava-demo"

    await asyncio.to_thread(run)
    assert vision.service.engine.num_unfinished() == 0


async def test_fuzz_generate_and_models_on_the_diffusion_service(
    fuzz_stack: tuple[Gateway, str, int],
) -> None:
    _, _, port = fuzz_stack

    def run() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            tenant = (("x-dreamsight-tenant", "fuzzer"),)

            @FUZZ
            @given(generate_requests)
            def generate(request: diffusion_pb2.GenerateRequest) -> None:
                _check(lambda: stub.Generate(request, metadata=tenant, timeout=60))

            @FUZZ
            @given(st.text(max_size=300))
            def delete(name: str) -> None:
                _check(
                    lambda: stub.DeleteModel(
                        diffusion_pb2.DeleteModelRequest(name=name), metadata=tenant, timeout=10
                    )
                )

            @FUZZ
            @given(st.text(max_size=100), st.integers(0, 2**32 - 1), st.text(max_size=50))
            def jobs(job_id: str, page_size: int, token: str) -> None:
                for call in (
                    lambda: stub.GetTrainingJob(
                        diffusion_pb2.GetTrainingJobRequest(job_id=job_id), metadata=tenant,
                        timeout=10,
                    ),
                    lambda: stub.CancelTrainingJob(
                        diffusion_pb2.CancelTrainingJobRequest(job_id=job_id), metadata=tenant,
                        timeout=10,
                    ),
                    lambda: stub.WatchTrainingJob(
                        diffusion_pb2.WatchTrainingJobRequest(job_id=job_id), metadata=tenant,
                        timeout=10,
                    ),
                    lambda: stub.ListTrainingJobs(
                        diffusion_pb2.ListTrainingJobsRequest(
                            page_size=page_size, page_token=token
                        ),
                        metadata=tenant, timeout=10,
                    ),
                ):  # fmt: skip
                    _check(call)

            generate()
            delete()
            jobs()
            assert stub.ListModels(diffusion_pb2.ListModelsRequest(), metadata=tenant).models

    await asyncio.to_thread(run)


async def test_fuzz_the_gateway_services_and_metadata(
    fuzz_stack: tuple[Gateway, str, int],
) -> None:
    gateway, key, _ = fuzz_stack
    header = st.one_of(
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
        st.sampled_from([f"Bearer {key}", "Bearer ", "Bearer " + "a" * 5000, ADMIN_TOKEN]),
    )

    def run() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            usage = usage_pb2_grpc.UsageServiceStub(channel)
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            vision = vision_pb2_grpc.VisionServiceStub(channel)

            @FUZZ
            @given(header, st.text(max_size=20), st.text(max_size=10), texts)
            def calls(authorization: str, tenant: str, tier: str, description: str) -> None:
                metadata = (("authorization", authorization),)
                _check(lambda: usage.GetUsage(usage_pb2.GetUsageRequest(), metadata=metadata))
                _check(
                    lambda: admin.CreateKey(
                        admin_pb2.CreateKeyRequest(
                            tenant=tenant, tier=tier, description=description
                        ),
                        metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
                    )
                )
                _check(lambda: admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=metadata))
                _check(
                    lambda: admin.RevokeKey(
                        admin_pb2.RevokeKeyRequest(key_id=tenant), metadata=metadata
                    )
                )
                _check(lambda: vision.ListModels(vision_pb2.ListModelsRequest(), metadata=metadata))

            calls()
            assert (
                usage.GetUsage(
                    usage_pb2.GetUsageRequest(), metadata=(("authorization", f"Bearer {key}"),)
                ).tenant
                == "fuzzer"
            )

    await asyncio.to_thread(run)
    assert await gateway.core.limiter.in_flight("fuzzer") == 0
