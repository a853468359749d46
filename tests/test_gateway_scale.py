"""The gateway at scale: shared Redis limits, PostgreSQL ledger, Prometheus.

Real servers from the Debian packages, started by the tests on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from gateway.server import Gateway
from tests.external_servers import postgres_server, prometheus_server, redis_server
from tests.gateway_helpers import FakeBackend, FakeVision, bearer, collect, gateway_for, new_key
from tests.service_process import ServiceProcess


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    fake = FakeBackend(FakeVision())
    await fake.start()
    yield fake
    await fake.kill()


def _fresh_database(dsn: str) -> str:
    import psycopg

    name = f"ledger_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return dsn.rsplit("/", 1)[0] + f"/{name}"


async def test_postgres_ledger_bills_every_call_and_survives_restart(
    tmp_path: Path, backend: FakeBackend, postgres_dsn: str
) -> None:
    database = _fresh_database(postgres_dsn)
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text("tiers:\n  tiny: {concurrent_requests: 2, windows: {5h: 1.0}}\n")
    gw = await gateway_for(tmp_path, backend.port, database=database, tiers_file=str(tiers))
    key = await new_key(gw, "pg-tenant", "tiny")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        same = (*bearer(key), ("x-request-id", "once"))
        await collect(ch, "hi", same)
        await collect(ch, "hi", same)  # the same request id: a second computation, billed
        assert gw.store.sync.total_usage() == (2, 1.0)  # 1.0: spent
    await gw.stop(0)

    again = await gateway_for(tmp_path, backend.port, database=database, tiers_file=str(tiers))
    try:
        assert again.store.sync.total_usage() == (2, 1.0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{again.port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(ch, "hi", bearer(key))  # the key, too, survived
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "5h window" in (caught.value.details() or "")
    finally:
        await again.stop(0)


async def test_postgres_writes_waiting_bills_in_one_transaction_each_once(
    postgres_dsn: str,
) -> None:
    """The ledger's group writes on PostgreSQL: a duplicate in the group is
    billed once, a bad bill costs no other bill its row."""
    from typing import Any, cast

    from gateway.store import AsyncStore, Bill, SqlStore

    def bill(ledger_id: str, tenant: Any = "t") -> Bill:
        return Bill(ledger_id, tenant, "pro", "VisionService", 1.0, 1.0)

    store = AsyncStore(SqlStore(_fresh_database(postgres_dsn)))
    try:
        assert await store.record_usage(bill("first"))
        billed = await asyncio.gather(
            *(store.record_usage(bill(f"call-{i}")) for i in range(10)),
            store.record_usage(bill("first")),
        )
        assert billed == [True] * 10 + [False]
        outcomes = await asyncio.gather(
            store.record_usage(bill("good")),
            store.record_usage(bill("bad", tenant=cast(Any, object()))),
            return_exceptions=True,
        )
        assert outcomes[0] is True and isinstance(outcomes[1], Exception)
        assert store.sync.total_usage() == (12, 12.0)
    finally:
        store.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_version_1_ledger_moves_into_the_new_one(
    tmp_path: Path, postgres_dsn: str, engine: str
) -> None:
    """Rows of the ledger keyed by the caller's request id survive the upgrade."""
    from gateway.store import SqlStore

    database = str(tmp_path / "v1.sqlite3") if engine == "sqlite" else _fresh_database(postgres_dsn)
    old = SqlStore(database)
    old._execute("DROP TABLE gpu_ledger")
    old._execute(
        "CREATE TABLE usage_ledger (request_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
        "tier TEXT NOT NULL, service TEXT NOT NULL, gpu_seconds DOUBLE PRECISION NOT NULL, "
        "recorded_at DOUBLE PRECISION NOT NULL)"
    )
    old._execute("INSERT INTO usage_ledger VALUES ('t:r1', 't', 'pro', 'VisionService', 2.5, 1.0)")
    old.close()
    store = SqlStore(database)
    try:
        (entry,) = store.usage_entries("t", 0)
        assert (entry.ledger_id, entry.request_id, entry.gpu_seconds) == ("t:r1", "t:r1", 2.5)
        assert not store._has_table("usage_ledger")
        assert store.record_usage("call:1", "t", "pro", "VisionService", 1.0, 2.0, "r1")
        assert store.total_usage() == (2, 3.5)
    finally:
        store.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_version_2_ledger_gains_the_estimated_column(
    tmp_path: Path, postgres_dsn: str, engine: str
) -> None:
    """A ledger from before estimates keeps its rows (all reported) and takes estimates."""
    from gateway.store import SqlStore

    database = str(tmp_path / "v2.sqlite3") if engine == "sqlite" else _fresh_database(postgres_dsn)
    old = SqlStore(database)
    old._execute("DROP TABLE gpu_ledger")
    old._execute(
        "CREATE TABLE gpu_ledger (ledger_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, "
        "tier TEXT NOT NULL, service TEXT NOT NULL, gpu_seconds DOUBLE PRECISION NOT NULL, "
        "recorded_at DOUBLE PRECISION NOT NULL, request_id TEXT NOT NULL DEFAULT '')"
    )
    old._execute(
        "INSERT INTO gpu_ledger VALUES ('call:a', 't', 'pro', 'VisionService', 2.5, 1.0, 'r')"
    )
    old.close()
    store = SqlStore(database)
    try:
        assert store.record_usage("call:b", "t", "pro", "VisionService", 1.0, 2.0, "", True)
        first, second = store.usage_entries("t", 0)
        assert (first.ledger_id, first.estimated) == ("call:a", False)
        assert (second.ledger_id, second.estimated, second.gpu_seconds) == ("call:b", True, 1.0)
    finally:
        store.close()


async def test_two_gateways_sharing_redis_enforce_one_limit(
    tmp_path: Path, backend: FakeBackend, redis_url: str
) -> None:
    database = str(tmp_path / "shared.sqlite3")
    first = await gateway_for(
        tmp_path, backend.port, database=database, redis_url=redis_url, queue_length=40,
        queue_wait_s=20,
    )  # fmt: skip
    second = await gateway_for(
        tmp_path, backend.port, database=database, redis_url=redis_url, queue_length=40,
        queue_wait_s=20,
    )  # fmt: skip
    try:
        key = await new_key(first, "shared-pro", "pro")
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as a,
            grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as b,
        ):
            results = await asyncio.gather(
                *(collect(ch, "sleep:0.1", bearer(key)) for ch in [a, b] * 10)
            )
        assert all(r[-1].HasField("final") for r in results)
        assert backend.impl.peak["shared-pro"] == 3
        assert await first.core.limiter.in_flight("shared-pro") == 0
    finally:
        await first.stop(0)
        await second.stop(0)


def _start_gateway_process(
    tmp_path: Path, backend_port: int, database: str, redis_url: str
) -> tuple[subprocess.Popen[str], int]:
    env = dict(
        os.environ,
        DREAMSIGHT_GATEWAY_VISION_TARGET=f"127.0.0.1:{backend_port}",
        DREAMSIGHT_GATEWAY_DATABASE=database,
        DREAMSIGHT_GATEWAY_REDIS_URL=redis_url,
        DREAMSIGHT_GATEWAY_LEASE_TTL_SECONDS="1.5",
        DREAMSIGHT_GATEWAY_PORT="0",
        DREAMSIGHT_GATEWAY_METRICS_PORT="0",
    )
    service = ServiceProcess("gateway", [], env)
    return service.proc, service.wait_for_port()


async def test_a_killed_gateways_slots_come_back_after_the_lease(
    tmp_path: Path, backend: FakeBackend, redis_url: str
) -> None:
    database = str(tmp_path / "shared.sqlite3")
    survivor = await gateway_for(
        tmp_path, backend.port, database=database, redis_url=redis_url, lease_ttl_s=1.5
    )
    proc, port = await asyncio.to_thread(
        _start_gateway_process, tmp_path, backend.port, database, redis_url
    )
    try:
        key = await new_key(survivor, "crashy", "free")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as doomed:
            call = asyncio.ensure_future(collect(doomed, "sleep:30", bearer(key)))
            for _ in range(100):
                if await survivor.core.limiter.in_flight("crashy") == 1:
                    break
                await asyncio.sleep(0.05)
            assert await survivor.core.limiter.in_flight("crashy") == 1
            proc.send_signal(signal.SIGKILL)  # no release, no goodbye
            proc.wait()
            with pytest.raises(grpc.aio.AioRpcError):
                await call
        started = time.monotonic()
        while await survivor.core.limiter.in_flight("crashy") != 0:
            assert time.monotonic() - started < 10, "the lease never expired"
            await asyncio.sleep(0.1)
        assert time.monotonic() - started <= 3.0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{survivor.port}") as ch:
            assert (await collect(ch, "hi", bearer(key)))[-1].HasField("final")
    finally:
        if proc.poll() is None:
            proc.kill()
        await survivor.stop(0)


def _query(prometheus: str, expr: str) -> list[dict[str, object]]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success"
    result: list[dict[str, object]] = body["data"]["result"]
    return result


async def test_metrics_scraped_by_a_real_prometheus(tmp_path: Path, backend: FakeBackend) -> None:
    gw: Gateway = await gateway_for(tmp_path, backend.port)
    try:
        key = await new_key(gw, "observed", "max")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            for _ in range(3):
                await collect(ch, "hi", bearer(key))
        target = f"127.0.0.1:{gw.server.metrics_port}"
        with prometheus_server([target]) as prometheus:
            expr = 'dreamsight_gateway_requests_total{code="OK",method="Chat",tier="max"}'
            result: list[dict[str, object]] = []
            for _ in range(150):
                result = await asyncio.to_thread(_query, prometheus, expr)
                if result:
                    break
                await asyncio.sleep(0.2)
            assert result, "Prometheus never scraped the gateway"
            value = result[0]["value"]
            assert isinstance(value, list) and float(value[1]) == 3.0
            gpu = await asyncio.to_thread(
                _query, prometheus, "sum(dreamsight_gateway_gpu_seconds_total)"
            )
            value = gpu[0]["value"]
            assert isinstance(value, list) and float(value[1]) == pytest.approx(1.5)
    finally:
        await gw.stop(0)
