"""``python -m vision_service`` as operators run it: start, serve, SIGTERM."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil  # type: ignore[import-untyped]
import pytest
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.service_process import ServiceProcess

pytestmark = pytest.mark.slow


def beside_while_busy(
    stub: vision_pb2_grpc.VisionServiceStub, engine_core: psutil.Process, beside: set[int]
) -> bool:
    """Whether the engine core ran on the worker's cores while eight long chats ran."""
    request = vision_pb2.ChatRequest(
        messages=[vision_pb2.Message(role=vision_pb2.ROLE_USER, content="Count on.")],
        options=vision_pb2.ChatOptions(temperature=0.0, max_tokens=400, ignore_eos=True),
    )
    with ThreadPoolExecutor(8) as pool:
        chats = [pool.submit(lambda: list(stub.Chat(request, timeout=120))) for _ in range(8)]
        seen = False
        while not all(c.done() for c in chats):
            seen = seen or set(engine_core.cpu_affinity()) == beside
            time.sleep(0.01)
        assert all(c.result()[-1].WhichOneof("event") == "final" for c in chats)
    return seen


def test_sigterm_drains_streams_then_exits(llava_dir: Path) -> None:
    service = ServiceProcess(
        "vision_service",
        [
            f"--model={llava_dir}",
            "--served-model-name=llava-demo",
            "--port=0",
            "--metrics-port=0",
            "--max-model-len=1024",
            "--enforce-eager",
            "--dtype=float32",
            "--grace-seconds=20",
            "--trust-any-caller",  # this test calls the backend directly
        ],
    )
    try:
        port = service.wait_for_port()
        seen = service.wait_serving(port)
        assert seen == {
            health_pb2.HealthCheckResponse.NOT_SERVING,
            health_pb2.HealthCheckResponse.SERVING,
        }
        # Its own process: vLLM's environment read once, as in vLLM's engine core.
        assert "vLLM's environment variables are read once from now on" in service.log(10**6)
        # Placed once its engine was up: off the core vLLM bound its CPU worker to
        # (the engine core too, while the engine is not busy).
        tree = psutil.Process(service.proc.pid).children(recursive=True)
        workers = [p for p in tree if "Worker" in " ".join(p.cmdline()[:1])]
        assert workers, [p.cmdline()[:1] for p in tree]
        taken = set().union(*(p.cpu_affinity() for p in workers))
        assert taken < os.sched_getaffinity(0)
        for process in [psutil.Process(service.proc.pid), *tree]:
            if process not in workers:
                assert not set(process.cpu_affinity()) & taken, process.cmdline()[:1]
        # The front end (every thread) under SCHED_BATCH; vLLM's processes as vLLM left them.
        tids = os.listdir(f"/proc/{service.proc.pid}/task")
        assert {os.sched_getscheduler(int(t)) for t in tids} == {os.SCHED_BATCH}
        assert {os.sched_getscheduler(p.pid) for p in tree} == {os.SCHED_OTHER}
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)

        stub = vision_pb2_grpc.VisionServiceStub(channel)
        if len(os.sched_getaffinity(0) - taken) == 1:  # one core left: the engine core shifts
            (engine_core,) = [p for p in tree if "EngineCore" in " ".join(p.cmdline()[:1])]
            beside = set(workers[0].cpu_affinity())
            assert beside_while_busy(stub, engine_core, beside), "it never moved under load"
            deadline = time.monotonic() + 10
            while set(engine_core.cpu_affinity()) & beside:  # back once the load is gone
                assert time.monotonic() < deadline, "it never came back"
                time.sleep(0.05)
        request = vision_pb2.ChatRequest(
            messages=[vision_pb2.Message(role=vision_pb2.ROLE_USER, content="Tell a story.")],
            options=vision_pb2.ChatOptions(temperature=1.0, seed=3, max_tokens=600),
        )
        stream = stub.Chat(request)
        first = next(iter(stream))
        assert first.WhichOneof("event") == "delta"
        service.proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the in-flight stream finishes within the grace period
        assert rest[-1].WhichOneof("event") == "final"
        assert rest[-1].final.finish_reason in (
            vision_pb2.FINISH_REASON_LENGTH,
            vision_pb2.FINISH_REASON_STOP,
        )
        assert service.wait() == 0, service.log()
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        service.kill()


def test_a_model_that_fails_to_load_exits_non_zero_with_the_cause(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    service = ServiceProcess(
        "vision_service",
        [f"--model={empty}", "--port=0", "--metrics-port=0", "--trust-any-caller"],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    try:
        service.wait_for_port()
        assert service.wait(timeout=120) == 1, service.log()
        assert "vision failed to load; exiting" in service.log(200)
        assert str(empty) in service.log(200), "the cause names the model directory"
    finally:
        service.kill()
