"""A DreamBooth job is billed when it ends, whoever watches (issue 16).

Real gateway, real diffusion service (the session's, training the tiny demo
Stable Diffusion for two steps on the CPU). The tests create jobs through the
gateway and never look at them through it again: the gateway's sweeper finds
them ended and bills them, once, also when they end while no gateway runs and
when two gateway replicas sweep one PostgreSQL ledger.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from dreamsight.common.v1 import common_pb2
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from PIL import Image

from dreamsight_server.errors import ResourceExhausted
from dreamsight_server.lifecycle import ServerOptions
from dreamsight_server.metadata import TENANT_HEADER
from gateway.config import GatewaySettings
from gateway.server import Gateway, start_gateway
from gateway.store import SqlStore, UsageEntry
from gateway.training import TrainingMeter
from tests.external_servers import free_port, postgres_server
from tests.gateway_helpers import ADMIN_TOKEN, bearer, new_key

pytestmark = pytest.mark.slow

SWEEP_S = 0.3
ENDED = (
    diffusion_pb2.JOB_STATE_SUCCEEDED,
    diffusion_pb2.JOB_STATE_FAILED,
    diffusion_pb2.JOB_STATE_CANCELLED,
)


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    with postgres_server() as dsn:
        yield dsn


def _fresh_database(dsn: str) -> str:
    import psycopg

    name = f"jobs_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return dsn.rsplit("/", 1)[0] + f"/{name}"


async def start(
    database: str, diffusion_port: int, sweep_s: float = SWEEP_S, tiers_file: str = ""
) -> Gateway:
    """A gateway whose backends are the diffusion service (HTTP off)."""
    settings = GatewaySettings(
        vision_target=f"127.0.0.1:{diffusion_port}",
        diffusion_target=f"127.0.0.1:{diffusion_port}",
        database=database,
        tiers_file=tiers_file,
        admin_token=ADMIN_TOKEN,
        http_port=None,
        job_sweep_s=sweep_s,
        server=ServerOptions(metrics_port=None, grace_s=1.0),
    )
    return await start_gateway(settings)


def png(seed: int) -> bytes:
    """A 64x64 photo-like PNG: a coloured disc on a gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    base = np.stack([x * 4, y * 4, np.full_like(x, 128)], axis=-1)
    base[(x - 32) ** 2 + (y - 32) ** 2 < 20**2] = rng.integers(0, 255, 3)
    out = io.BytesIO()
    Image.fromarray(base.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


async def create_job(gateway: Gateway, key: str) -> str:
    """Create a two-step job through the gateway; never look at it there again."""
    request = diffusion_pb2.CreateTrainingJobRequest(
        spec=diffusion_pb2.TrainingSpec(
            base_model="sd-demo",
            instance_images=[common_pb2.Image(data=png(i)) for i in range(3)],
            instance_prompt="a photo of sks circle",
            max_train_steps=2,
            resolution=64,
            seed=1,
        )
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        reply = await stub.CreateTrainingJob(request, metadata=bearer(key), timeout=30)
    assert reply.job.state in (diffusion_pb2.JOB_STATE_QUEUED, diffusion_pb2.JOB_STATE_RUNNING)
    return str(reply.job.job_id)


async def ended_job(diffusion: Any, tenant: str, job_id: str) -> diffusion_pb2.TrainingJob:
    """Wait, asking the diffusion service directly (not the gateway), until the job ends."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{diffusion.port}") as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        deadline = time.monotonic() + 240
        while True:
            reply = await stub.GetTrainingJob(
                diffusion_pb2.GetTrainingJobRequest(job_id=job_id),
                metadata=((TENANT_HEADER, tenant),),
            )
            if reply.job.state in ENDED:
                return reply.job
            assert time.monotonic() < deadline, f"job {job_id} did not end: {reply.job}"
            await asyncio.sleep(0.25)


def job_entries(store: SqlStore, tenant: str) -> list[UsageEntry]:
    return [e for e in store.usage_entries(tenant, 0) if e.ledger_id.startswith("job:")]


async def billed(store: SqlStore, tenant: str, within_s: float) -> list[UsageEntry]:
    """The tenant's job rows, once there is one (or the time is up)."""
    deadline = time.monotonic() + within_s
    while not (entries := job_entries(store, tenant)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return entries


async def test_a_job_nobody_watches_is_billed_once_when_it_ends(
    tmp_path: Path, diffusion_backend: Any
) -> None:
    gateway = await start(str(tmp_path / "gateway.sqlite3"), diffusion_backend.port)
    try:
        key = await new_key(gateway, "unwatched", "max")
        job_id = await create_job(gateway, key)
        store = gateway.store.sync
        assert [j.job_id for j in store.unbilled_jobs("unwatched")] == [job_id]

        job = await ended_job(diffusion_backend, "unwatched", job_id)
        assert job.state == diffusion_pb2.JOB_STATE_SUCCEEDED, job
        assert job.usage.gpu_seconds > 0
        entries = await billed(store, "unwatched", within_s=10 * SWEEP_S)
        assert [e.ledger_id for e in entries] == [f"job:{job_id}"]
        assert entries[0].gpu_seconds == pytest.approx(job.usage.gpu_seconds, rel=1e-9)
        assert store.unbilled_jobs() == [], "the sweeper is done with the job"

        # More rounds, and the other paths seeing it ended, bill nothing more.
        await asyncio.sleep(5 * SWEEP_S)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            await stub.GetTrainingJob(
                diffusion_pb2.GetTrainingJobRequest(job_id=job_id), metadata=bearer(key)
            )
        assert len(job_entries(store, "unwatched")) == 1
        rows, gpu_seconds = store.total_usage()
        assert rows == 1 and gpu_seconds == pytest.approx(job.usage.gpu_seconds, rel=1e-9)
    finally:
        await gateway.stop(0)


async def test_a_job_that_ends_while_no_gateway_runs_is_billed_once_by_two_replicas(
    tmp_path: Path, diffusion_backend: Any, postgres_dsn: str
) -> None:
    """Both replicas stop before the job ends; after they come back on the same
    PostgreSQL ledger both sweep, and the job is billed once."""
    database = _fresh_database(postgres_dsn)
    first = await start(database, diffusion_backend.port)
    second = await start(database, diffusion_backend.port)
    key = await new_key(first, "restarted", "max")
    job_id = await create_job(first, key)
    await asyncio.gather(first.stop(0), second.stop(0))

    job = await ended_job(diffusion_backend, "restarted", job_id)
    assert job.state == diffusion_pb2.JOB_STATE_SUCCEEDED, job
    store = SqlStore(database)
    try:
        assert job_entries(store, "restarted") == [], "nobody billed it while no gateway ran"
        assert [j.job_id for j in store.unbilled_jobs("restarted")] == [job_id]
    finally:
        store.close()

    replicas = [await start(database, diffusion_backend.port) for _ in range(2)]
    try:
        store = replicas[0].store.sync
        entries = await billed(store, "restarted", within_s=10 * SWEEP_S)
        assert [e.ledger_id for e in entries] == [f"job:{job_id}"]
        assert entries[0].gpu_seconds == pytest.approx(job.usage.gpu_seconds, rel=1e-9)
        await asyncio.sleep(5 * SWEEP_S)
        assert len(job_entries(store, "restarted")) == 1
        assert store.unbilled_jobs() == []
        billed_by = [
            r.core.metrics.gpu_seconds.labels("max", "DiffusionService")._value.get()
            for r in replicas
        ]
        assert sorted(billed_by) == [0, pytest.approx(job.usage.gpu_seconds)], "one replica billed"
    finally:
        await asyncio.gather(*(r.stop(0) for r in replicas))


async def test_a_new_jobs_budget_check_sees_the_tenants_ended_jobs(
    tmp_path: Path, diffusion_backend: Any
) -> None:
    """Before CreateTrainingJob is admitted the proxy calls before_admission, which
    bills the tenant's ended jobs, so a spent budget refuses the next job even when
    the sweeper has not come round yet (here: once an hour)."""
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(
        "tiers:\n  tiny: {concurrent_requests: 1, training_jobs: 1, windows: {5h: 1}}\n"
    )
    gateway = await start(
        str(tmp_path / "gateway.sqlite3"), diffusion_backend.port, 3600.0, str(tiers)
    )
    try:
        key = await new_key(gateway, "spender", "tiny")
        job_id = await create_job(gateway, key)
        job = await ended_job(diffusion_backend, "spender", job_id)
        assert job.usage.gpu_seconds > 1, "more than the window allows"
        caller, tier = await gateway.core.authenticate(f"Bearer {key}")
        await gateway.core.budgets.check(caller, tier)  # unbilled yet: not refused
        async with grpc.aio.insecure_channel(f"127.0.0.1:{diffusion_backend.port}") as channel:
            meter = TrainingMeter(gateway.core, channel, gateway.store)
            await meter.before_admission("GetTrainingJob", f"Bearer {key}")  # not a new job
            assert job_entries(gateway.store.sync, "spender") == []
            await meter.before_admission("CreateTrainingJob", "Bearer ds_000000000000_nope")
            assert job_entries(gateway.store.sync, "spender") == []
            await meter.before_admission("CreateTrainingJob", f"Bearer {key}")
        entries = job_entries(gateway.store.sync, "spender")
        assert [e.ledger_id for e in entries] == [f"job:{job_id}"]
        assert entries[0].gpu_seconds == pytest.approx(job.usage.gpu_seconds, rel=1e-9)
        assert gateway.store.sync.unbilled_jobs() == []
        with pytest.raises(ResourceExhausted):
            await gateway.core.budgets.check(caller, tier)
    finally:
        await gateway.stop(0)


async def test_the_sweeper_outlives_a_down_backend_and_drops_a_job_that_is_gone(
    tmp_path: Path, diffusion_backend: Any
) -> None:
    database = str(tmp_path / "gateway.sqlite3")
    nobody = free_port()
    gateway = await start(database, nobody)
    try:
        gateway.store.sync.remember_job("no-such-job", "gone", "max", time.time())
        await asyncio.sleep(5 * SWEEP_S)  # rounds against a backend that is not there
        assert gateway.sweeper is not None and not gateway.sweeper.done()
        assert [j.job_id for j in gateway.store.sync.unbilled_jobs()] == ["no-such-job"]
    finally:
        await gateway.stop(0)

    gateway = await start(database, diffusion_backend.port)
    try:
        deadline = time.monotonic() + 10 * SWEEP_S
        while gateway.store.sync.unbilled_jobs() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert gateway.store.sync.unbilled_jobs() == [], "NOT_FOUND: done with it"
        assert gateway.store.sync.total_usage() == (0, 0.0)
    finally:
        await gateway.stop(0)
