"""Gateway benchmark: direct vs nginx grpc_pass vs our gateway, interleaved.

    python bench/bench_gateway.py [--rounds N]

One fast streaming backend (grpc.aio, small chunks; bench/fake_backend.py)
and three paths to it: direct; Debian's nginx with ``grpc_pass`` (one worker:
the C proxy that sets the bar); our gateway (``python -m gateway``) with a
real key, admission, metering (SQLite ledger) and metrics on. Each runs in
its own process; the load comes from this one.

Measured: added p50/p99 latency of a unary call and of a stream's first chunk
at one stream; the gateway's CPU microseconds per streamed chunk (from
/proc) at 64 streams; chunks/s at 64 streams as a ratio to direct, for nginx
and for us; 1,000 concurrent streams through the gateway (errors, RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from dreamsight.gateway.v1 import admin_pb2, admin_pb2_grpc
from dreamsight.vision.v1 import vision_pb2, vision_pb2_grpc

from tests.external_servers import free_port

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "bench-admin-token"
TIERS = "tiers:\n  bench: {concurrent_requests: 5000, windows: {5h: 1e12, 7d: 1e12}}\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _wait_line(proc: subprocess.Popen[str], pattern: str) -> re.Match[str]:
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(pattern, line)
        if match:
            return match
    raise RuntimeError(f"process exited before printing {pattern!r}")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_nginx(workdir: Path, backend_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    (workdir / "nginx").mkdir()
    config = workdir / "nginx" / "nginx.conf"
    config.write_text(
        f"""
worker_processes 1;
pid {workdir}/nginx/nginx.pid;
error_log {workdir}/nginx/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/nginx/body;
    proxy_temp_path {workdir}/nginx/proxy;
    fastcgi_temp_path {workdir}/nginx/fastcgi;
    uwsgi_temp_path {workdir}/nginx/uwsgi;
    scgi_temp_path {workdir}/nginx/scgi;
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} http2;
        http2_max_concurrent_streams 4096;
        keepalive_requests 10000000;
        location / {{
            grpc_pass grpc://backend;
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
        }}
    }}
}}
"""
    )
    proc = subprocess.Popen(
        ["nginx", "-c", str(config), "-p", str(workdir / "nginx"), "-g", "daemon off;"],
        stderr=subprocess.DEVNULL,
    )
    return proc, port


async def wait_ready(port: int, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        for _ in range(300):
            try:
                await stub.ListModels(vision_pb2.ListModelsRequest(), metadata=metadata, timeout=1)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
    raise TimeoutError(f"nothing serves on {port}")


def chat(chunks: int) -> vision_pb2.ChatRequest:
    return vision_pb2.ChatRequest(
        messages=[vision_pb2.Message(role=vision_pb2.ROLE_USER, content=f"chunks:{chunks}")]
    )


class Path_:
    """One way to the backend: a channel and the metadata it needs."""

    def __init__(self, name: str, port: int, metadata: tuple[tuple[str, str], ...]) -> None:
        self.name = name
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_concurrent_streams", 10000)]
        )
        self.stub = vision_pb2_grpc.VisionServiceStub(self.channel)
        self.metadata = metadata

    async def unary(self) -> float:
        start = time.perf_counter()
        await self.stub.ListModels(vision_pb2.ListModelsRequest(), metadata=self.metadata)
        return time.perf_counter() - start

    async def first_chunk(self) -> float:
        start = time.perf_counter()
        first = 0.0
        async for _ in self.stub.Chat(chat(4), metadata=self.metadata):
            if not first:
                first = time.perf_counter() - start
        return first

    async def stream(self, chunks: int) -> int:
        count = 0
        async for _ in self.stub.Chat(chat(chunks), metadata=self.metadata):
            count += 1
        return count


async def sample(fn: Callable[[], Awaitable[float]], n: int) -> list[float]:
    return [await fn() for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--chunks", type=int, default=200, help="chunks per stream at 64 streams")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    backend = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "fake_backend.py")],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    backend_port = int(_wait_line(backend, r"listening on [\d.]+:(\d+)").group(1))
    (workdir / "tiers.yaml").write_text(TIERS)
    gateway_port = free_port()
    gateway_env = dict(
        env,
        DREAMSIGHT_GATEWAY_VISION_TARGET=f"127.0.0.1:{backend_port}",
        DREAMSIGHT_GATEWAY_DIFFUSION_TARGET=f"127.0.0.1:{backend_port}",
        DREAMSIGHT_GATEWAY_DATABASE=str(workdir / "gateway.sqlite3"),
        DREAMSIGHT_GATEWAY_TIERS_FILE=str(workdir / "tiers.yaml"),
        DREAMSIGHT_GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN,
        DREAMSIGHT_GATEWAY_PORT=str(gateway_port),
        DREAMSIGHT_GATEWAY_METRICS_PORT=str(free_port()),
        DREAMSIGHT_GATEWAY_QUEUE_LENGTH="0",
        DREAMSIGHT_GATEWAY_HTTP_PORT="-1",
    )
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway"], env=gateway_env, stderr=subprocess.DEVNULL
    )
    nginx, nginx_port = start_nginx(workdir, backend_port)
    bare_port = free_port()
    bare = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "bare_proxy.py"), str(bare_port), str(backend_port)]
    )
    try:
        await wait_ready(backend_port)
        await wait_ready(nginx_port)
        await wait_ready(bare_port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port}") as admin_channel:
            admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
            for _ in range(300):
                try:
                    created = await admin.CreateKey(
                        admin_pb2.CreateKeyRequest(tenant="bench", tier="bench"),
                        metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
                    )
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
        key = (("authorization", f"Bearer {created.secret}"),)
        paths = [
            Path_("direct", backend_port, ()),
            Path_("nginx", nginx_port, ()),
            Path_("bare", bare_port, ()),
            Path_("gateway", gateway_port, key),
        ]
        for path in paths:  # warm-up
            await sample(path.unary, 50)
            await asyncio.gather(*(path.stream(20) for _ in range(64)))

        unary: dict[str, list[float]] = {p.name: [] for p in paths}
        first: dict[str, list[float]] = {p.name: [] for p in paths}
        rate: dict[str, list[float]] = {p.name: [] for p in paths}
        cpu_per_chunk: dict[str, list[float]] = {"gateway": [], "bare": []}
        pids = {"gateway": gateway.pid, "bare": bare.pid}
        for _ in range(args.rounds):
            for path in paths:
                unary[path.name] += await sample(path.unary, args.latency_samples)
                first[path.name] += await sample(path.first_chunk, args.latency_samples)
            for path in paths:
                cpu_before = _cpu_seconds(pids.get(path.name, gateway.pid))
                start = time.perf_counter()
                counts = await asyncio.gather(*(path.stream(args.chunks) for _ in range(64)))
                elapsed = time.perf_counter() - start
                chunks = sum(counts)
                rate[path.name].append(chunks / elapsed)
                if path.name in pids:
                    used = _cpu_seconds(pids[path.name]) - cpu_before
                    cpu_per_chunk[path.name].append(used / chunks * 1e6)

        print(f"{'path':8} {'unary_p50_ms':>12} {'unary_p99_ms':>12} {'first_p50_ms':>12} "
              f"{'first_p99_ms':>12} {'chunks/s@64':>12}")  # fmt: skip
        for path in paths:
            u, f = unary[path.name], first[path.name]
            print(
                f"{path.name:8} {pct(u, 0.5) * 1e3:>12.3f} {pct(u, 0.99) * 1e3:>12.3f} "
                f"{pct(f, 0.5) * 1e3:>12.3f} {pct(f, 0.99) * 1e3:>12.3f} "
                f"{statistics.median(rate[path.name]):>12.0f}"
            )
        added_p50 = (pct(unary["gateway"], 0.5) - pct(unary["direct"], 0.5)) * 1e3
        added_first = (pct(first["gateway"], 0.5) - pct(first["direct"], 0.5)) * 1e3
        nginx_added = (pct(unary["nginx"], 0.5) - pct(unary["direct"], 0.5)) * 1e3
        print(f"added p50: gateway unary {added_p50:.3f} ms, first chunk {added_first:.3f} ms; "
              f"nginx unary {nginx_added:.3f} ms")  # fmt: skip
        direct_rate = statistics.median(rate["direct"])
        ratio = statistics.median(rate["gateway"]) / direct_rate
        nginx_ratio = statistics.median(rate["nginx"]) / direct_rate
        cpu_us = statistics.median(cpu_per_chunk["gateway"])
        bare_cpu_us = statistics.median(cpu_per_chunk["bare"])
        bare_ratio = statistics.median(rate["bare"]) / direct_rate
        print(f"bare pass-through: cpu_us_per_chunk={bare_cpu_us:.1f} ratio_64={bare_ratio:.3f}")

        # 1,000 concurrent streams through the gateway, each long enough to overlap.
        gateway_path = next(p for p in paths if p.name == "gateway")
        request = vision_pb2.ChatRequest(
            messages=[vision_pb2.Message(role=vision_pb2.ROLE_USER, content="sleep:3")]
        )
        peak_rss = _rss_mb(gateway.pid)

        async def long_stream() -> bool:
            try:
                async for _ in gateway_path.stub.Chat(request, metadata=key, timeout=120):
                    pass
                return True
            except grpc.aio.AioRpcError:
                return False

        tasks = [asyncio.ensure_future(long_stream()) for _ in range(1000)]
        while not all(t.done() for t in tasks):
            peak_rss = max(peak_rss, _rss_mb(gateway.pid))
            await asyncio.sleep(0.2)
        errors = sum(1 for t in tasks if not t.result())
        print(
            f"bench gateway: added_p50_ms={added_p50:.3f} cpu_us_per_chunk={cpu_us:.1f} "
            f"throughput_ratio_64={ratio:.3f} nginx_ratio_64={nginx_ratio:.3f} "
            f"streams_1000_errors={errors} rss_mb_1000={peak_rss:.0f}"
        )
        for path in paths:
            await path.channel.close(grace=None)
    finally:
        for proc in (gateway, nginx, bare, backend):
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
