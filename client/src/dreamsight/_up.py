"""``dreamsight up``: gateway, vision and diffusion on loopback, one command.

Each service runs as its own process (``python -m vision_service`` ...) from
the server packages installed beside the client; the client imports none of
their code. The services put the demo models in place on first run: the
small models trained on synthetic shapes that come with the source tree
(``models/``, or ``$DREAMSIGHT_DEMO_MODELS``), or random-weight ones where
there are none. Random-weight
demo models left in HOME by an older version are swapped for the trained
ones first (``python -m dreamsight_server.demo_weights refresh``). A demo API key
is minted through the AdminService with a per-run admin token and kept in
``HOME/demo_key`` for the next run. Ctrl-C or SIGTERM stops everything: each
service gets SIGTERM and its grace period, then its whole process group is
killed, so no engine process outlives ``up``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING


def health_status(channel: grpc.Channel) -> int:
    """The server's overall grpc.health.v1 status (0 when unreachable).

    Spoken as raw bytes so the client needs no grpcio-health-checking: the
    request (service "") is empty; the reply is field 1, a varint status.
    """
    check = channel.unary_unary("/grpc.health.v1.Health/Check", None, None)
    try:
        reply: bytes = check(b"", timeout=2)
    except grpc.RpcError:
        return 0
    return reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """The running services."""

    home: Path
    gateway_port: int
    http_port: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[IO[bytes]] = field(default_factory=list)
    admin_token: str = ""
    api_key: str = ""

    @property
    def target(self) -> str:
        """The gateway's gRPC address."""
        return f"127.0.0.1:{self.gateway_port}"

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM each service, wait for the grace period, then kill its group."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # engine subprocesses included
            proc.wait()
        for log in self.logs:
            log.close()


def check_servers_installed() -> None:
    """Fail with advice when the server packages are not importable."""
    missing = [m for m in ("gateway", "vision_service", "diffusion_service") if not _has(m)]
    if missing:
        raise SystemExit(
            f"dreamsight up needs the server packages ({', '.join(missing)} missing): "
            "run `make setup` in the repository, or pip install "
            "'dreamsight-server[vision,diffusion,gateway]'"
        )


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def start(home: Path, gateway_port: int, http_port: int, quiet: bool = False) -> Stack:
    """Start the three services and return once they all serve."""
    check_servers_installed()
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    vision_port, diffusion_port = _free_port(), _free_port()
    gateway_port = gateway_port or _free_port()
    http_port = _free_port() if http_port == 0 else http_port  # -1: no HTTP
    stack = Stack(home, gateway_port, http_port, admin_token=secrets.token_urlsafe(24))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    _refresh_demo_models(home, env, quiet)
    commands: dict[str, tuple[list[str], dict[str, str]]] = {
        "vision": (
            ["-m", "vision_service", f"--model={home / 'models' / 'llava-demo'}",
             f"--port={vision_port}", "--metrics-port=0", "--enforce-eager",
             "--max-model-len=2048", "--grace-seconds=10"],
            {},
        ),
        "diffusion": (
            ["-m", "diffusion_service", f"--port={diffusion_port}", "--metrics-port=0",
             f"--model=sd-demo={home / 'models' / 'sd-demo'}", "--grace-seconds=10",
             f"--artifacts-dir={home / 'training'}",
             f"--training-store={home / 'training' / 'jobs.sqlite3'}"],
            {},
        ),
        "gateway": (
            ["-m", "gateway", f"--port={gateway_port}", "--metrics-port=0",
             f"--vision-target=127.0.0.1:{vision_port}",
             f"--diffusion-target=127.0.0.1:{diffusion_port}",
             f"--database={home / 'gateway.sqlite3'}", "--grace-seconds=10"],
            {"DREAMSIGHT_GATEWAY_ADMIN_TOKEN": stack.admin_token,
             "DREAMSIGHT_GATEWAY_HTTP_PORT": str(http_port)},
        ),
    }  # fmt: skip
    try:
        for name, (args, extra_env) in commands.items():
            log = open(home / "logs" / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop)
            stack.logs.append(log)
            stack.processes[name] = subprocess.Popen(
                [sys.executable, *args],
                env={**env, **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as one
            )
        ports = {"vision": vision_port, "diffusion": diffusion_port, "gateway": gateway_port}
        for name, port in ports.items():
            _wait_serving(name, port, stack, timeout=600)
            if not quiet:
                print(f"  {name:9} serving on 127.0.0.1:{port}", file=sys.stderr)
        stack.api_key = _demo_key(stack)
    except BaseException:
        stack.stop(grace_s=5)
        raise
    return stack


def _refresh_demo_models(home: Path, env: dict[str, str], quiet: bool) -> None:
    """Swap random-weight demo models in HOME for the trained ones, when the
    server packages come with them; anything else in HOME is left alone."""
    models = home / "models"
    command = [
        sys.executable, "-m", "dreamsight_server.demo_weights", "refresh",
        f"{models / 'llava-demo'}=llava", f"{models / 'sd-demo'}=stable-diffusion",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"could not put the demo models in place:\n{done.stderr.strip()}")
    if not quiet:
        for line in done.stdout.splitlines():
            path, _, action = line.rpartition(": ")
            if action in ("installed", "replaced"):
                print(f"  demo model {Path(path).name}: {action} (trained)", file=sys.stderr)


def _wait_serving(name: str, port: int, stack: Stack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        while time.monotonic() < deadline:
            proc = stack.processes[name]
            if proc.poll() is not None:
                raise SystemExit(
                    f"{name} exited with {proc.returncode}; see {stack.home / 'logs' / name}.log"
                )
            if health_status(channel) == SERVING:
                return
            time.sleep(0.25)
    raise SystemExit(f"{name} did not become healthy in {timeout:.0f}s")


def _demo_key(stack: Stack) -> str:
    """Reuse the demo key of a previous run if it still works; else mint one."""
    from dreamsight._client import Client
    from dreamsight._errors import AuthenticationError

    saved = stack.home / "demo_key"
    if saved.exists():
        secret = saved.read_text().strip()
        try:
            with Client(stack.target, api_key=secret) as client:
                client.usage()
            return secret
        except AuthenticationError:
            pass
    with Client(stack.target, api_key=stack.admin_token) as admin:
        created = admin.create_key("demo", "max", "dreamsight up demo key")
    saved.write_text(created.secret + "\n")
    saved.chmod(0o600)
    return created.secret


def run_forever(stack: Stack) -> None:
    """Block until Ctrl-C or SIGTERM (or a service dies), then stop everything."""
    stopping = {"now": False}

    def stop(*_: Any) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping["now"]:
            dead = [n for n, p in stack.processes.items() if p.poll() is not None]
            if dead:
                print(f"{', '.join(dead)} stopped unexpectedly; shutting down", file=sys.stderr)
                break
            time.sleep(0.2)
    finally:
        print("stopping dreamsight ...", file=sys.stderr)
        stack.stop()
        print("stopped", file=sys.stderr)
