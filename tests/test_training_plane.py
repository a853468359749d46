"""The training plane across replicas (issue 18): two diffusion processes
share one PostgreSQL job store and one artifacts directory behind one gateway.

Each replica is ``python -m diffusion_service`` as operators run it, with one
training slot and a two-second lease. A job created through the gateway runs
on one of them; a cancel sent to the other stops it; a job whose replica is
SIGKILLed (with its worker: a lost node) is resumed by the survivor from its
last checkpoint, and a watcher on the survivor sees every event of the
job's history once, in order. The job is billed once, and its model serves
from both replicas. Jobs train the tiny demo pipeline at 64x64 on the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from dreamsight.common.v1 import common_pb2
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc

from diffusion_service.jobs.postgres_store import PostgresJobStore
from diffusion_service.jobs.store import StoredJob
from dreamsight_server.lifecycle import ServerOptions
from dreamsight_server.metadata import GATEWAY_TOKEN_HEADER, TENANT_HEADER
from gateway.config import GatewaySettings
from gateway.server import Gateway, start_gateway
from tests.external_servers import postgres_server
from tests.gateway_helpers import ADMIN_TOKEN, bearer, new_key
from tests.job_store_helpers import fresh_database
from tests.service_process import ServiceProcess
from tests.test_training_billing import png

pytestmark = pytest.mark.slow

SECRET = "training-plane-secret"
LEASE_S = 2.0
TENANT = "carol"
DEFAULTS_YAML = """
max_train_steps: 8
learning_rate: 1.0e-4
checkpoint_interval: 2
trainer:
  lr_warmup_steps: 1
  keep_checkpoints: 2
class_images:
  batch_size: 2
  inference_steps: 2
validation:
  inference_steps: 2
"""
ENDED = (
    diffusion_pb2.JOB_STATE_SUCCEEDED,
    diffusion_pb2.JOB_STATE_FAILED,
    diffusion_pb2.JOB_STATE_CANCELLED,
)


@dataclass
class Replica:
    """One diffusion process and a channel to it (as the gateway calls it)."""

    name: str
    process: ServiceProcess
    port: int
    channel: grpc.aio.Channel

    @property
    def stub(self) -> diffusion_pb2_grpc.DiffusionServiceAsyncStub:
        return diffusion_pb2_grpc.DiffusionServiceStub(self.channel)


METADATA = ((TENANT_HEADER, TENANT), (GATEWAY_TOKEN_HEADER, SECRET))


@dataclass
class Plane:
    replicas: dict[str, Replica]
    gateway: Gateway
    key: str
    store: PostgresJobStore
    artifacts: Path

    def job(self, job_id: str) -> StoredJob:
        job = self.store.get(job_id)
        assert job is not None
        return job


def replica_process(name: str, url: str, artifacts: Path, sd_dir: Path, defaults: Path) -> Any:
    args = [
        "--port=0", "--metrics-port=0", f"--model=sd-demo={sd_dir}", "--device=cpu",
        f"--artifacts-dir={artifacts}", f"--training-store={url}",
        "--training-concurrency=1", f"--training-lease-s={LEASE_S}",
        f"--training-replica-id={name}", "--training-accelerator=cpu",
        f"--training-defaults={defaults}", "--grace-seconds=2",
    ]  # fmt: skip
    env = {**os.environ, "DREAMSIGHT_DIFFUSION_GATEWAY_SECRET": SECRET}
    return ServiceProcess("diffusion_service", args, env=env)


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture(scope="module")
async def plane(
    sd_dir: Path, tmp_path_factory: pytest.TempPathFactory, postgres_dsn: str
) -> AsyncIterator[Plane]:
    root = tmp_path_factory.mktemp("training-plane")
    defaults = root / "defaults.yaml"
    defaults.write_text(DEFAULTS_YAML)
    url = fresh_database(postgres_dsn)
    artifacts = root / "shared-artifacts"
    processes = {n: replica_process(n, url, artifacts, sd_dir, defaults) for n in ("a", "b")}
    replicas: dict[str, Replica] = {}
    gateway: Gateway | None = None
    try:
        for name, process in processes.items():
            port = await asyncio.to_thread(process.wait_for_port)
            replicas[name] = Replica(
                name, process, port, grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            )
        for replica in replicas.values():
            await asyncio.to_thread(replica.process.wait_serving, replica.port)
        ports = ",".join(f"127.0.0.1:{r.port}" for r in replicas.values())
        gateway = await start_gateway(
            GatewaySettings(
                vision_target=f"ipv4:{ports}",
                diffusion_target=f"ipv4:{ports}",
                database=str(root / "gateway.sqlite3"),
                admin_token=ADMIN_TOKEN,
                backend_secret=SECRET,
                http_port=None,
                job_sweep_s=0.5,
                server=ServerOptions(metrics_port=None, grace_s=1.0),
            )
        )
        key = await new_key(gateway, TENANT, "max")
        yield Plane(replicas, gateway, key, PostgresJobStore(url), artifacts)
    finally:
        if gateway is not None:
            await gateway.stop(0)
        for replica in replicas.values():
            await replica.channel.close(None)
        for process in processes.values():
            process.kill()


async def create(plane: Plane, **fields: Any) -> str:
    """A job created through the gateway (it picks the replica)."""
    spec = diffusion_pb2.TrainingSpec(
        base_model="sd-demo",
        instance_images=[common_pb2.Image(data=png(i)) for i in range(3)],
        instance_prompt="a photo of sks circle",
        resolution=64,
        seed=5,
        **fields,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.gateway.port}") as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        reply = await stub.CreateTrainingJob(
            diffusion_pb2.CreateTrainingJobRequest(spec=spec), metadata=bearer(plane.key)
        )
    return str(reply.job.job_id)


async def runner_of(plane: Plane, job_id: str) -> str:
    """The replica that claimed the job (from its lease in the store)."""
    deadline = time.monotonic() + 60
    while (owner := plane.job(job_id).lease_owner) is None:
        assert time.monotonic() < deadline, "nobody claimed the job"
        await asyncio.sleep(0.1)
    return owner


async def watch(
    replica: Replica, job_id: str, until: Any = None
) -> list[diffusion_pb2.WatchTrainingJobResponse]:
    """A job's events from one replica, to its last (or until ``until(event)``)."""
    events = []
    call = replica.stub.WatchTrainingJob(
        diffusion_pb2.WatchTrainingJobRequest(job_id=job_id), metadata=METADATA
    )
    async for event in call:
        events.append(event)
        if until is not None and until(event):
            call.cancel()
            break
    return events


def identity(event: diffusion_pb2.WatchTrainingJobResponse) -> tuple[str, int, int]:
    return (event.WhichOneof("event") or "", event.time.seconds, event.time.nanos // 1000)


def kill_node(replica: Replica, job_dir: Path) -> None:
    """SIGKILL a replica and its training workers, as a lost node loses them."""
    os.kill(replica.process.proc.pid, signal.SIGKILL)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ours = str(job_dir).encode() in cmdline
            if ours and b"diffusion_service.dreambooth.worker" in cmdline:
                os.killpg(int(entry.name), signal.SIGKILL)
    replica.process.wait()


async def test_a_cancel_sent_to_the_other_replica_stops_the_job_within_a_step(
    plane: Plane,
) -> None:
    job_id = await create(plane, max_train_steps=200, output_model_name="carol-cat")
    runner = plane.replicas[await runner_of(plane, job_id)]
    (other,) = [r for r in plane.replicas.values() if r is not runner]
    before = await watch(other, job_id, lambda e: e.training_step.step >= 1)
    reply = await other.stub.CancelTrainingJob(
        diffusion_pb2.CancelTrainingJobRequest(job_id=job_id), metadata=METADATA
    )
    assert reply.job.state == diffusion_pb2.JOB_STATE_CANCELLED
    events = await watch(runner, job_id)
    assert events[-1].WhichOneof("event") == "cancelled"
    assert [identity(e) for e in events[: len(before)]] == [identity(e) for e in before]
    # The runner heard it and stopped its worker after the running step: the
    # worker says so in its log (a worker that ignored it would be killed
    # after 10 s and say nothing), and its checkpoints are cleaned up.
    job_dir = plane.artifacts / "jobs" / job_id
    deadline = time.monotonic() + 30
    while f"job {job_id}: cancelled" not in (log := (job_dir / "worker.log").read_text()):
        assert time.monotonic() < deadline, log[-2000:]
        await asyncio.sleep(0.2)
    assert "ignored its stop" not in runner.process.log(200)
    job = plane.job(job_id)
    assert job.state.value == "cancelled" and job.lease_owner is None
    assert job.step < 200 and job.attempts == 1


async def test_a_model_trained_on_one_replica_serves_from_the_other_without_restart(
    plane: Plane,
) -> None:
    job_id = await create(plane, max_train_steps=2, output_model_name="carol-bird")
    runner = plane.replicas[await runner_of(plane, job_id)]
    (other,) = [r for r in plane.replicas.values() if r is not runner]
    events = await watch(other, job_id)
    assert events[-1].WhichOneof("event") == "succeeded", events[-1]
    # At once, on the replica that never saw the job run.
    assert (await generate(other, "carol-bird")).model == "carol-bird"
    listed = await other.stub.ListModels(diffusion_pb2.ListModelsRequest(), metadata=METADATA)
    assert "carol-bird" in [m.name for m in listed.models]
    # Another tenant still cannot see it, on either replica, nor the job.
    mallory = ((TENANT_HEADER, "mallory"), (GATEWAY_TOKEN_HEADER, SECRET))
    for replica in plane.replicas.values():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await replica.stub.GetTrainingJob(
                diffusion_pb2.GetTrainingJobRequest(job_id=job_id), metadata=mallory
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == f"training job {job_id!r} not found"
    # Deleted on the runner, it is gone on the other replica too.
    await runner.stub.DeleteModel(
        diffusion_pb2.DeleteModelRequest(name="carol-bird"), metadata=METADATA
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(other, "carol-bird")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_job_survives_the_loss_of_its_replica(plane: Plane) -> None:
    total = 8
    job_id = await create(plane, max_train_steps=total, output_model_name="carol-dog")
    runner = plane.replicas[await runner_of(plane, job_id)]
    (survivor,) = [r for r in plane.replicas.values() if r is not runner]
    watcher = asyncio.create_task(watch(survivor, job_id))
    seen = await watch(runner, job_id, lambda e: e.checkpoint_saved.step >= 2)
    kill_node(runner, plane.artifacts / "jobs" / job_id)

    events = await asyncio.wait_for(watcher, 240)
    assert events[-1].WhichOneof("event") == "succeeded", events[-1]
    # The survivor's watcher saw the whole history, each event once, in order.
    history = plane.store.events(job_id)
    assert [identity(e) for e in seen] == [identity(e) for e in events[: len(seen)]]
    assert len(events) == len(history)
    assert [(e.WhichOneof("event"), e.time.seconds) for e in events] == [
        (_oneof(h.payload), int(h.time)) for h in history
    ]
    # Resumed from its last checkpoint, with the same step count and schedule.
    job = plane.job(job_id)
    assert (job.state.value, job.step, job.crashes, job.attempts) == ("succeeded", total, 1, 2)
    steps = [e.training_step for e in events if e.WhichOneof("event") == "training_step"]
    numbers = [s.step for s in steps]
    assert set(numbers) == set(range(1, total + 1)) and numbers[-1] == total
    for i in range(1, len(numbers)):
        if numbers[i] <= numbers[i - 1]:  # the resumed run's first step
            checkpoints = [
                e.checkpoint_saved.step
                for e in events
                if e.WhichOneof("event") == "checkpoint_saved"
            ]
            assert numbers[i] - 1 in checkpoints, f"resumed at {numbers}"
    assert {s.total_steps for s in steps} == {total}
    assert all(s.learning_rate == pytest.approx(1e-4) for s in steps if s.step > 1)

    # Billed once, for what the job's replicas charged.
    ledger_id = f"job:{job_id}"
    store = plane.gateway.store.sync
    deadline = time.monotonic() + 30
    while not [e for e in store.usage_entries(TENANT, 0) if e.ledger_id == ledger_id]:
        assert time.monotonic() < deadline, "the job was never billed"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.5)  # three more sweeps, and they bill nothing more
    billed = [e.gpu_seconds for e in store.usage_entries(TENANT, 0) if e.ledger_id == ledger_id]
    assert billed == [pytest.approx(job.gpu_seconds, rel=1e-9)] and job.gpu_seconds > 0

    # The survivor, which did not start the job, serves its model.
    assert (await generate(survivor, "carol-dog")).model == "carol-dog"


async def generate(replica: Replica, model: str) -> diffusion_pb2.GenerateResult:
    request = diffusion_pb2.GenerateRequest(
        prompt="a photo of sks circle", model=model, steps=2, width=64, height=64, seed=1
    )
    replies = [r async for r in replica.stub.Generate(request, metadata=METADATA)]
    assert replies[-1].WhichOneof("event") == "result"
    return replies[-1].result


def _oneof(payload: Any) -> str:
    return {
        "JobQueued": "queued",
        "ClassImagesProgress": "class_images",
        "TrainingStep": "training_step",
        "CheckpointSaved": "checkpoint_saved",
        "ValidationImage": "validation_image",
        "JobSucceeded": "succeeded",
        "JobFailed": "failed",
        "JobCancelled": "cancelled",
    }[type(payload).__name__]
