"""``python -m vision_service`` as operators run it: start, serve, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.slow


def _wait_for_port(proc: subprocess.Popen[str], lines: list[str]) -> int:
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        match = re.search(r"vision listening on [\d.]+:(\d+)", line)
        if match:
            return int(match.group(1))
    raise AssertionError("service exited before listening:\n" + "".join(lines[-30:]))


def test_sigterm_drains_streams_then_exits(llava_dir: Path) -> None:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vision_service",
            f"--model={llava_dir}",
            "--served-model-name=llava-demo",
            "--port=0",
            "--metrics-port=0",
            "--max-model-len=1024",
            "--enforce-eager",
            "--dtype=float32",
            "--grace-seconds=20",
        ],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    try:
        port = _wait_for_port(proc, lines)
        drain = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
        drain.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        seen = set()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest()).status
            seen.add(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.2)
        assert seen == {
            health_pb2.HealthCheckResponse.NOT_SERVING,
            health_pb2.HealthCheckResponse.SERVING,
        }

        stub = vision_pb2_grpc.VisionServiceStub(channel)
        request = vision_pb2.ChatRequest(
            messages=[vision_pb2.Message(role=vision_pb2.ROLE_USER, content="Tell a story.")],
            options=vision_pb2.ChatOptions(temperature=1.0, seed=3, max_tokens=600),
        )
        stream = stub.Chat(request)
        first = next(iter(stream))
        assert first.WhichOneof("event") == "delta"
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the in-flight stream finishes within the grace period
        assert rest[-1].WhichOneof("event") == "final"
        assert rest[-1].final.finish_reason in (
            vision_pb2.FINISH_REASON_LENGTH,
            vision_pb2.FINISH_REASON_STOP,
        )
        assert proc.wait(timeout=60) == 0
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
