"""A service run as operators run it (``python -m SERVICE``), for the process tests."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ServiceProcess:
    """``python -m module args``, its stderr collected in ``lines``."""

    def __init__(
        self, module: str, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> None:
        self.name = module.removesuffix("_service")
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=None if env is None else dict(env),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self._drain: threading.Thread | None = None

    def wait_for_port(self) -> int:
        """The gRPC port from the ``NAME listening on HOST:PORT`` log line; the
        rest of stderr is then collected in the background."""
        assert self.proc.stderr is not None
        pattern = re.compile(rf"{self.name} listening on [\d.]+:(\d+)")
        for line in self.proc.stderr:
            self.lines.append(line)
            match = pattern.search(line)
            if match:
                self._drain = threading.Thread(target=self._collect, daemon=True)
                self._drain.start()
                return int(match.group(1))
        raise AssertionError(f"{self.name} exited before listening:\n{self.log()}")

    def _collect(self) -> None:
        self.lines.extend(self.proc.stderr or [])

    def wait_serving(self, port: int, timeout: float = 240) -> set[int]:
        """Poll grpc.health.v1 until SERVING; the statuses seen on the way."""
        seen: set[int] = set()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest()).status
                seen.add(status)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return seen
                assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
                time.sleep(0.2)
        raise AssertionError(f"{self.name} did not become SERVING:\n{self.log()}")

    def wait(self, timeout: float = 60) -> int:
        """The exit status, once the process has ended (and its output is read)."""
        code = self.proc.wait(timeout=timeout)
        if self._drain is not None:
            self._drain.join(timeout=5)
        else:
            self.lines.extend(self.proc.stderr or [])
        return code

    def log(self, last: int = 40) -> str:
        """The last lines of stderr, for assertion messages."""
        return "".join(self.lines[-last:])

    def kill(self) -> None:
        """Kill it if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
