"""Malformed bodies on both HTTP APIs: always a 4xx that says why, never a 500,
and nothing held afterwards (hypothesis, as tests/test_fuzz.py does for gRPC)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.server import Gateway
from tests.gateway_helpers import FakeBackend, FakeVision, gateway_for, new_key, no_slots_held

ENDPOINTS = [
    "/api/chat",
    "/api/generate",
    "/api/show",
    "/v1/chat/completions",
    "/v1/images/generations",
]
FIELDS = ["model", "messages", "prompt", "stream", "options", "images", "size", "n", "name",
          "max_tokens", "temperature", "stop", "format", "response_format", "keep_alive",
          "content", "role", "seed", "tools", "raw"]  # fmt: skip

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from([*FIELDS, "x"]), children, max_size=5)
    ),
    max_leaves=20,
)
message = st.fixed_dictionaries(
    {}, optional={"role": json_values | st.sampled_from(["user", "system", "bogus"]),
                  "content": json_values, "images": json_values}
)  # fmt: skip
objects = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["fake", "", "nope"]) | json_values,
        "messages": st.lists(message, max_size=3) | json_values,
        "prompt": st.text(max_size=20) | json_values,
        "stream": st.booleans() | json_values,
        "options": st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4) | json_values,
        "size": st.sampled_from(["64x64", "big", "0x0"]) | json_values,
        **{name: json_values for name in ("n", "max_tokens", "stop", "format", "name")},
    },
)
raw_bodies = st.sampled_from(
    [
        b"",
        b"{",
        b"[1, 2]",
        b'"text"',
        b"\xff\xfe{}",
        b'{"model": "fake", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"n": 1' + b"0" * 5000 + b"}",
        b'{"max_tokens": 1e999}',
        b'{"temperature": NaN}',
        b"[" * 100_000,
        b'{"a":' * 40 + b"1" + b"}" * 40,
    ]
)


@pytest.fixture(scope="module")
async def http_target(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Gateway, str]]:
    backend = FakeBackend(FakeVision())
    await backend.start()
    gw = await gateway_for(tmp_path_factory.mktemp("http-fuzz"), backend.port, http_port=0)
    key = await new_key(gw, "http-fuzzer", "max")
    yield gw, key
    await gw.stop(0)
    await backend.kill()


async def _post(url: str, key: str, body: bytes, content_type: str) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=30)
        ) as response,
    ):
        return response.status, await response.text()


def _check(status: int, text: str, body: bytes) -> None:
    assert status != 500, f"500 for {body[:200]!r}: {text[:300]}"
    if status >= 400:
        assert status in (400, 404, 413, 429), (status, text[:300])
        assert text.strip(), "every refusal says why"


FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


async def test_fuzz_http_bodies_are_refused_clearly(http_target: tuple[Gateway, str]) -> None:
    gateway, key = http_target
    # hypothesis drives blocking calls from a thread; the gateway serves on this loop.
    await asyncio.to_thread(_fuzz, gateway, key)


def _fuzz(gateway: Gateway, key: str) -> None:
    base = f"http://127.0.0.1:{gateway.http_port}"

    def run(body: bytes, endpoint: str, content_type: str = "application/json") -> None:
        status, text = asyncio.run(_post(base + endpoint, key, body, content_type))
        _check(status, text, body)

    @FUZZ
    @given(objects, st.sampled_from(ENDPOINTS))
    def structured(body: dict[str, Any], endpoint: str) -> None:
        run(json.dumps(body).encode(), endpoint)

    @settings(max_examples=30, deadline=None)
    @given(raw_bodies, st.sampled_from(ENDPOINTS))
    def raw(body: bytes, endpoint: str) -> None:
        run(body, endpoint)

    structured()
    raw()
    run(b"{}", "/api/chat", "application/json; charset=no-such-charset")
    run(
        '{"model": "fake"}'.encode("utf-16"),
        "/v1/chat/completions",
        "application/json; charset=utf-16",
    )


async def test_nothing_is_held_after_the_fuzz(http_target: tuple[Gateway, str]) -> None:
    gateway, _ = http_target
    await no_slots_held(gateway, "http-fuzzer")  # the slot follows the bill


async def test_each_malformed_kind_names_the_body(http_target: tuple[Gateway, str]) -> None:
    gateway, key = http_target
    url = f"http://127.0.0.1:{gateway.http_port}/v1/chat/completions"
    for body, says in [
        (b"[" * 100_000, "nested deeper"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nested deeper"),
        (b'{"n": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b'{"max_tokens": 1e999}', "out of range"),
        (b'{"temperature": NaN}', "NaN is not JSON"),
        (b"\xff\xfe{}", "not valid utf-8"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "invalid unicode"),
    ]:
        status, text = await _post(url, key, body, "application/json")
        assert status == 400 and says in text and "body" in text, (body[:40], text)
    status, text = await _post(url, key, b"{}", "application/json; charset=no-such-charset")
    assert status == 400 and "unsupported charset" in text
