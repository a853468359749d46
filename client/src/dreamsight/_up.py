"""``dreamsight up``: gateway, vision and diffusion on loopback, one command.

Each service runs as its own process (``python -m vision_service`` ...) from
the server packages installed beside the client; the client imports none of
their code. With no model named it serves the demo models, which it puts in
place first (``python -m dreamsight_demo.weights install``): the small models
trained on synthetic shapes that come with the source tree (``models/``, or
``$DREAMSIGHT_DEMO_MODELS``), swapped in for random-weight ones an older
version left in HOME, or random-weight ones where there are none. With
``--vision-model`` / ``--diffusion-model`` (a Hugging Face directory or hub
id) it serves those instead, as ``ollama run MODEL`` does. A demo API key
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
    needed = ("gateway", "vision_service", "diffusion_service", "dreamsight_demo")
    missing = [m for m in needed if not _has(m)]
    if missing:
        raise SystemExit(
            f"dreamsight up needs the server packages ({', '.join(missing)} missing): "
            "run `make setup` in the repository, or pip install "
            "'dreamsight-server[vision,diffusion,gateway]'"
        )


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class Models:
    """What ``dreamsight up`` serves; empty model fields mean the demo models."""

    vision: str = ""
    """A LLaVA Hugging Face directory or hub id."""
    diffusion: str = ""
    """A Stable Diffusion directory or hub id, optionally ``NAME=SOURCE``."""
    quantization: str = ""
    kv_cache_dtype: str = ""
    max_model_len: int = 2048
    tool_call_parser: str = ""
    """vLLM's tool call parser for the vision model's family (tool_choice auto)."""


@dataclass(frozen=True)
class Ports:
    """The ports of one stack (HTTP -1: off)."""

    gateway: int
    http: int
    vision: int
    diffusion: int


def service_commands(
    home: Path, models: Models, ports: Ports, admin_token: str, backend_secret: str
) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each service's ``python`` arguments and extra environment. The backends
    accept only calls that carry backend_secret (fresh for every start), so no
    other local process can call them directly and claim a tenant."""
    demo = home / "models"
    vision = ["-m", "vision_service", f"--model={models.vision or demo / 'llava-demo'}",
              f"--port={ports.vision}", "--metrics-port=0", "--grace-seconds=10",
              f"--max-model-len={models.max_model_len}"]  # fmt: skip
    if not models.vision:
        vision.append("--enforce-eager")  # the toy gains nothing from compiling
    if models.quantization:
        vision.append(f"--quantization={models.quantization}")
    if models.kv_cache_dtype:
        vision.append(f"--kv-cache-dtype={models.kv_cache_dtype}")
    if models.tool_call_parser:
        vision.append(f"--tool-call-parser={models.tool_call_parser}")
    diffusion_model = models.diffusion or f"sd-demo={demo / 'sd-demo'}"
    return {
        "vision": (vision, {"DREAMSIGHT_VISION_GATEWAY_SECRET": backend_secret}),
        "diffusion": (
            ["-m", "diffusion_service", f"--port={ports.diffusion}", "--metrics-port=0",
             f"--model={diffusion_model}", "--grace-seconds=10",
             f"--artifacts-dir={home / 'training'}",
             f"--training-store={home / 'training' / 'jobs.sqlite3'}"],
            {"DREAMSIGHT_DIFFUSION_GATEWAY_SECRET": backend_secret},
        ),
        "gateway": (
            ["-m", "gateway", f"--port={ports.gateway}", "--metrics-port=0",
             f"--vision-target=127.0.0.1:{ports.vision}",
             f"--diffusion-target=127.0.0.1:{ports.diffusion}",
             f"--database={home / 'gateway.sqlite3'}", "--grace-seconds=10"],
            {"DREAMSIGHT_GATEWAY_ADMIN_TOKEN": admin_token,
             "DREAMSIGHT_GATEWAY_BACKEND_SECRET": backend_secret,
             "DREAMSIGHT_GATEWAY_HTTP_PORT": str(ports.http)},
        ),
    }  # fmt: skip


def demo_targets(home: Path, models: Models) -> list[str]:
    """The demo model directories to put in place (DIR=KIND), for the models not named."""
    demo = home / "models"
    targets = [] if models.vision else [f"{demo / 'llava-demo'}=llava"]
    if not models.diffusion:
        targets.append(f"{demo / 'sd-demo'}=stable-diffusion")
    return targets


def start(
    home: Path,
    gateway_port: int,
    http_port: int,
    quiet: bool = False,
    models: Models | None = None,
) -> Stack:
    """Start the three services and return once they all serve."""
    check_servers_installed()
    models = models or Models()
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    gateway_port = gateway_port or _free_port()
    http_port = _free_port() if http_port == 0 else http_port  # -1: no HTTP
    ports = Ports(gateway_port, http_port, _free_port(), _free_port())
    stack = Stack(home, gateway_port, http_port, admin_token=secrets.token_urlsafe(24))
    env = dict(os.environ)
    targets = demo_targets(home, models)
    if targets:
        _install_demo_models(targets, env, quiet)
    commands = service_commands(home, models, ports, stack.admin_token, secrets.token_urlsafe(24))
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
        serving = {"vision": ports.vision, "diffusion": ports.diffusion, "gateway": gateway_port}
        for name, port in serving.items():
            _wait_serving(name, port, stack, timeout=600)
            if not quiet:
                print(f"  {name:9} serving on 127.0.0.1:{port}", file=sys.stderr)
        place_beside(stack.processes["gateway"].pid, stack.processes["vision"].pid)
        stack.api_key = _demo_key(stack)
    except BaseException:
        stack.stop(grace_s=5)
        raise
    return stack


def place_beside(pid: int, beside: int) -> None:
    """Run process pid (every thread; those started later inherit it) on the cores
    process beside runs on, and under SCHED_BATCH where it runs so, when it keeps
    to fewer than this machine's: the vision service moves itself off vLLM's CPU
    workers' cores once its engine is up and runs under SCHED_BATCH
    (vision_service/placement.py), and the gateway, whose streams it feeds, goes
    with it. Linux only; elsewhere, or if either process is gone, nothing moves."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        cores = os.sched_getaffinity(beside)
        if cores == os.sched_getaffinity(0):
            return
        batch = os.sched_getscheduler(beside) == os.SCHED_BATCH
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.sched_setaffinity(int(tid), cores)
                if batch:
                    os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        return


def _install_demo_models(targets: list[str], env: dict[str, str], quiet: bool) -> None:
    """Put the demo models in place (trained ones where the source tree has them;
    random-weight ones from an older version are swapped for them)."""
    command = [sys.executable, "-m", "dreamsight_demo.weights", "install", *targets]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"could not put the demo models in place:\n{done.stderr.strip()}")
    if not quiet:
        for line in done.stdout.splitlines():
            path, _, action = line.rpartition(": ")
            if action in ("installed", "replaced", "built"):
                weights = "random weights" if action == "built" else "trained"
                print(f"  demo model {Path(path).name}: {action} ({weights})", file=sys.stderr)


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
