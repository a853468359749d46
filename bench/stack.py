"""What the benchmarks that go through the gateway share: free ports, a
gateway process as ``dreamsight up`` starts it (with the backend secret, a
key on a tier that admits the whole load), and waiting for health."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

BENCH_TIERS = "tiers:\n  bench: {concurrent_requests: 64, training_jobs: 0, windows: {5h: 1.0e9}}\n"
"""One tier for the load generator: the limits are not what is measured."""


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_grpc_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    """Until grpc.health.v1 on port says SERVING (or the process exits)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"port {port} never served")


@dataclass
class GatewayProcess:
    """``python -m gateway`` in front of a vision service, with a bench key."""

    workdir: Path
    vision_port: int
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the gateway process."""
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def backend_env(self) -> dict[str, str]:
        """The variable that makes the vision service accept this gateway (only)."""
        return {"DREAMSIGHT_VISION_GATEWAY_SECRET": self.secret}

    @property
    def running(self) -> subprocess.Popen[bytes]:
        """The gateway's process (after start())."""
        assert self.proc is not None, "start() first"
        return self.proc

    def start(self) -> None:
        """Start it (returns at once; serving() waits)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tiers.yaml").write_text(BENCH_TIERS)
        env = {
            **os.environ,
            "DREAMSIGHT_GATEWAY_BACKEND_SECRET": self.secret,
            "DREAMSIGHT_GATEWAY_ADMIN_TOKEN": self.admin_token,
            **self.env,
        }
        self._log = open(self.workdir / "gateway.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--port", str(self.port),
             "--http-port", str(self.http_port), "--metrics-port", str(self.metrics_port),
             f"--vision-target=127.0.0.1:{self.vision_port}",
             f"--database={self.workdir / 'gateway.sqlite3'}",
             f"--tiers-file={self.workdir / 'tiers.yaml'}"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip

    def serving(self) -> str:
        """Wait until it serves; a fresh key on the bench tier."""
        import grpc
        from dreamsight.gateway.v1 import admin_pb2, admin_pb2_grpc

        assert self.proc is not None
        wait_grpc_serving(self.port, self.proc)
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            reply = admin_pb2_grpc.AdminServiceStub(channel).CreateKey(
                admin_pb2.CreateKeyRequest(tenant="bench", tier="bench", description="bench"),
                metadata=(("authorization", f"Bearer {self.admin_token}"),),
                timeout=30,
            )
        return str(reply.secret)

    def metric_mean(self, name: str) -> tuple[float, float]:
        """(sum, count) of a histogram on this gateway's /metrics."""
        return histogram(self.metrics_port, name)

    def stop(self) -> None:
        """SIGTERM, then wait."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self._log is not None:
            self._log.close()


def histogram(port: int, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram, all label sets added, from a /metrics port."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_sum":
                total += sample.value
            elif sample.name == f"{name}_count":
                count += sample.value
    return total, count
