"""Chaos: the whole stack under mixed load while a backend is killed and
restarted and the gateway is restarted; then the invariants.

Real gateway (in process, restarted on the same port and database), real
vision (vLLM, the session's service), real diffusion (its own process, killed
with SIGKILL mid-training and restarted with the same store). Three tenants on
free, pro and max keys send chat streams and generations for a bounded time;
the max tenant also trains. Afterwards:

- no tenant ever held more slots than its tier allows (sampled every 5 ms);
- every slot came back;
- the ledger is exact: per tenant, the GPU-seconds billed for calls equal what
  the backends themselves metered (their ``settled`` log lines) within 1%,
  cancels, deadlines and repeated request ids included, no call billed twice;
  calls cut by the backend's kill are billed marked estimates, each bounded by
  the elapsed time; plus the training job once;
- the training job ended in a terminal state (it resumed after the kill);
- every service is healthy and serves the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from dreamsight.common.v1 import common_pb2
from dreamsight.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc

from dreamsight_server.lifecycle import ServerOptions
from gateway.config import GatewaySettings
from gateway.server import Gateway, start_gateway
from tests.conftest import VisionHandle
from tests.external_servers import free_port
from tests.gateway_helpers import new_key
from tests.test_vision_service import png

pytestmark = pytest.mark.slow

BACKEND_SECRET = "chaos-backend-secret"
LOAD_SECONDS = 24.0
KILL_DIFFUSION_AT = 6.0
RESTART_DIFFUSION_AFTER = 1.0
RESTART_GATEWAY_AT = 15.0
COLOURS = ["red", "blue"]
SUBJECT = ("red", "pink", "orange")
TIERS = {"chaos-free": ("free", 1, 2), "chaos-pro": ("pro", 3, 5), "chaos-max": ("max", 10, 12)}


@dataclass
class Record:
    """What the load generator saw."""

    completed: int = 0
    repeated: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    peak: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class DiffusionProcess:
    """python -m diffusion_service, killable and restartable on one port."""

    def __init__(self, sd_dir: Path, work: Path) -> None:
        self.port = free_port()
        self.args = [
            sys.executable, "-m", "diffusion_service", f"--port={self.port}",
            "--metrics-port=0", f"--model=sd-demo={sd_dir}", "--device=cpu",
            f"--artifacts-dir={work / 'artifacts'}",
            f"--training-store={work / 'jobs.sqlite3'}", "--grace-seconds=2",
            "--concurrency=2", "--max-queue=16",
        ]  # fmt: skip
        self.env = {**os.environ, "DREAMSIGHT_DIFFUSION_GATEWAY_SECRET": BACKEND_SECRET}
        self.log = open(work / "diffusion.log", "ab")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.args,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env,
        )

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers included: a crash
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


_SETTLED = re.compile(r"settled \S+ tenant=(\S*) request_id=\S* gpu_seconds=(\S+) ended=")


class _SettledLines(logging.Handler):
    """The in-process vision service's "settled" lines: its own metering per call."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _backend_account(vision: _SettledLines, diffusion_log: Path) -> dict[str, float]:
    """GPU-seconds per tenant as the backends metered them: the vision service's
    settled lines and the diffusion process's (both of its lives, one log)."""
    lines = [*vision.lines, *diffusion_log.read_text(errors="replace").splitlines()]
    spent: dict[str, float] = defaultdict(float)
    for line in lines:
        if match := _SETTLED.search(line):
            spent[match.group(1)] += float(match.group(2))
    return spent


async def _serving(port: int, timeout: float = 120) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"port {port} never served")


async def test_chaos_keeps_every_invariant(
    tmp_path: Path, vision: VisionHandle, sd_dir: Path
) -> None:
    diffusion = DiffusionProcess(sd_dir, tmp_path)
    diffusion.start()
    gateway_port = free_port()
    settings = GatewaySettings(
        vision_target=f"127.0.0.1:{vision.service.port}",
        diffusion_target=f"127.0.0.1:{diffusion.port}",
        database=str(tmp_path / "gateway.sqlite3"),
        backend_secret=BACKEND_SECRET,
        queue_length=4,
        queue_wait_s=2.0,
        http_port=None,
        server=ServerOptions(port=gateway_port, metrics_port=None, grace_s=2.0),
    )
    current: dict[str, Gateway] = {}
    record = Record()
    settled = _SettledLines()
    metering_log = logging.getLogger("dreamsight_server.metering")
    level = metering_log.level
    metering_log.setLevel(logging.INFO)
    metering_log.addHandler(settled)
    try:
        await _serving(diffusion.port)
        current["gw"] = await start_gateway(settings)
        keys = {
            tenant: await new_key(current["gw"], tenant, tier)
            for tenant, (tier, _, _) in TIERS.items()
        }
        stop_at = time.monotonic() + LOAD_SECONDS

        async def monitor() -> None:
            while time.monotonic() < stop_at + 5:
                for tenant in TIERS:
                    held = await current["gw"].core.limiter.in_flight(tenant)
                    record.peak[tenant] = max(record.peak[tenant], held)
                await asyncio.sleep(0.005)

        async def worker(tenant: str, seed: int) -> None:
            rng = random.Random(seed)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port}")
            vision_stub = vision_pb2_grpc.VisionServiceStub(channel)
            diffusion_stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            try:
                while time.monotonic() < stop_at:
                    # A third of the calls repeat one request id; a fifth are cancelled
                    # after their first message; a tenth run out of time.
                    repeat = rng.random() < 0.33
                    rid = "the-same-id" if repeat else uuid.uuid4().hex
                    metadata = (("authorization", f"Bearer {keys[tenant]}"), ("x-request-id", rid))
                    ending = rng.random()
                    cancel_early = ending < 0.2
                    timeout = 0.3 if 0.2 <= ending < 0.3 else 30
                    try:
                        final: Any = None
                        if rng.random() < 0.6:
                            request = vision_pb2.ChatRequest(
                                messages=[vision_pb2.Message(
                                    role=vision_pb2.ROLE_USER, content="Describe.",
                                    images=[common_pb2.Image(data=png(rng.choice(COLOURS)))],
                                )],
                                options=vision_pb2.ChatOptions(max_tokens=8, temperature=0.0),
                            )  # fmt: skip
                            chat = vision_stub.Chat(request, metadata=metadata, timeout=timeout)
                            async for r in chat:
                                if cancel_early:
                                    chat.cancel()
                                    break
                                if r.WhichOneof("event") == "final":
                                    final = r.final
                        else:
                            request_g = diffusion_pb2.GenerateRequest(
                                prompt="a red circle", steps=2
                            )
                            generate = diffusion_stub.Generate(
                                request_g, metadata=metadata, timeout=timeout
                            )
                            async for g in generate:
                                if cancel_early:
                                    generate.cancel()
                                    break
                                if g.WhichOneof("event") == "result":
                                    final = g.result
                        if final is not None:
                            record.completed += 1
                            record.repeated[tenant] += repeat
                    except grpc.aio.AioRpcError as error:
                        record.errors[error.code().name] += 1
                        assert error.code() in (
                            grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.CANCELLED,
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                        ), f"{error.code().name}: {error.details()}"
                        await asyncio.sleep(0.05)
            finally:
                await channel.close(grace=None)

        async def faults() -> str:
            # A DreamBooth job that spans the backend's crash.
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port}")
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            created = await stub.CreateTrainingJob(
                diffusion_pb2.CreateTrainingJobRequest(
                    spec=diffusion_pb2.TrainingSpec(
                        instance_images=[
                            common_pb2.Image(data=png(c, (64, 64))) for c in SUBJECT
                        ],
                        instance_prompt="a photo of sks circle",
                        class_prompt="a photo of a circle",
                        num_class_images=2,
                        max_train_steps=30,
                        checkpoint_interval=4,
                        resolution=64,
                        seed=0,
                    ),
                    client_request_id="chaos-job",
                ),
                metadata=(("authorization", f"Bearer {keys['chaos-max']}"),),
            )  # fmt: skip
            await channel.close(grace=None)
            await asyncio.sleep(KILL_DIFFUSION_AT)
            diffusion.kill()
            await asyncio.sleep(RESTART_DIFFUSION_AFTER)
            diffusion.start()
            await asyncio.sleep(RESTART_GATEWAY_AT - KILL_DIFFUSION_AT - RESTART_DIFFUSION_AFTER)
            old = current["gw"]
            await old.stop(grace_s=2.0)
            current["gw"] = await start_gateway(settings)
            return str(created.job.job_id)

        workers = [
            worker(tenant, seed * 100 + i)
            for seed, (tenant, (_, _, n)) in enumerate(TIERS.items())
            for i in range(n)
        ]
        results = await asyncio.gather(monitor(), faults(), *workers)
        job_id = str(results[1])
        gateway = current["gw"]

        # The job resumed after the crash and ended.
        await _serving(diffusion.port)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port}")
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        max_key = (("authorization", f"Bearer {keys['chaos-max']}"),)
        job: Any = None
        for _ in range(600):
            job = (
                await stub.GetTrainingJob(
                    diffusion_pb2.GetTrainingJobRequest(job_id=job_id), metadata=max_key
                )
            ).job
            if job.state in (
                diffusion_pb2.JOB_STATE_SUCCEEDED,
                diffusion_pb2.JOB_STATE_FAILED,
                diffusion_pb2.JOB_STATE_CANCELLED,
            ):
                break
            await asyncio.sleep(0.5)
        assert job.state == diffusion_pb2.JOB_STATE_SUCCEEDED, job
        assert job.step == 30

        # Concurrency never exceeded; every slot returned.
        for tenant, (_, limit, _) in TIERS.items():
            assert record.peak[tenant] <= limit, (tenant, record.peak[tenant])
            assert await gateway.core.limiter.in_flight(tenant) == 0
        assert record.peak["chaos-max"] > 1, "the load really ran in parallel"

        # The ledger against the backends' own account, tenant by tenant.
        await stub.GetTrainingJob(
            diffusion_pb2.GetTrainingJobRequest(job_id=job_id), metadata=max_key
        )  # the gateway bills the ended job when it sees it
        rows = gateway.store.sync._execute(
            "SELECT ledger_id, tenant, request_id, gpu_seconds, service, estimated FROM gpu_ledger"
        )
        assert len({r[0] for r in rows}) == len(rows), "no computation billed twice"
        jobs = {str(r[0]): float(r[3]) for r in rows if str(r[0]).startswith("job:")}
        assert list(jobs) == [f"job:{job_id}"] and jobs[f"job:{job_id}"] > 0
        calls = [r for r in rows if str(r[0]).startswith("call:")]
        assert len(calls) == len(rows) - 1
        metered = _backend_account(settled, tmp_path / "diffusion.log")
        for tenant in TIERS:
            billed = sum(float(r[3]) for r in calls if r[1] == tenant and not r[5])
            assert billed == pytest.approx(metered[tenant], rel=0.01, abs=1e-6), tenant
            same_id = [r for r in calls if r[1] == tenant and r[2] == "the-same-id"]
            assert len(same_id) >= record.repeated[tenant], "a repeated id is billed every time"
        estimates = [r for r in calls if r[5]]
        assert all(r[4] == "DiffusionService" for r in estimates), "only the killed backend's"
        assert len(estimates) <= sum(limit for _, limit, _ in TIERS.values())
        assert all(0 <= float(r[3]) <= 30 + settings.settle_timeout_s for r in estimates)
        assert record.completed > 20, record
        assert record.errors.get("UNAVAILABLE", 0) > 0, "the faults really hit callers"

        # Everything serves the next request.
        vision_stub = vision_pb2_grpc.VisionServiceStub(channel)
        reply = [
            r
            async for r in vision_stub.Chat(
                vision_pb2.ChatRequest(
                    messages=[vision_pb2.Message(role=vision_pb2.ROLE_USER, content="hi")],
                    options=vision_pb2.ChatOptions(max_tokens=3),
                ),
                metadata=max_key,
            )
        ]
        assert reply[-1].WhichOneof("event") == "final"
        generated = [
            g
            async for g in stub.Generate(
                diffusion_pb2.GenerateRequest(prompt="a blue square", steps=2), metadata=max_key
            )
        ]
        assert generated[-1].WhichOneof("event") == "result"
        await channel.close(grace=None)
        print(
            f"chaos: {record.completed} calls completed, errors {dict(record.errors)}, "
            f"peaks {dict(record.peak)}, job {job_id} {job.step} steps "
            f"{job.usage.gpu_seconds:.1f} GPU-s"
        )
    finally:
        metering_log.removeHandler(settled)
        metering_log.setLevel(level)
        if "gw" in current:
            await current["gw"].stop(grace_s=1.0)
        diffusion.stop()
