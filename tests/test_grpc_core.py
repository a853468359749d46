"""The gRPC core settings each service takes before grpc loads (dreamsight_server.grpc_core)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dreamsight_server import grpc_core

_PROBE = """
import asyncio, os, runpy, sys
runpy.run_module(sys.argv[1] + ".__main__")  # the entry point's imports, without main()
import grpc

async def probe():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.channel_ready()
    await server.stop(0)

asyncio.run(probe())
print(os.environ.get("GRPC_EXPERIMENTS"))
"""


def test_configure_sets_the_experiments_unless_the_operator_did() -> None:
    env: dict[str, str] = {}
    grpc_core.configure(env)
    assert env[grpc_core.VARIABLE] == ",".join(grpc_core.EXPERIMENTS)
    mine = {grpc_core.VARIABLE: ""}  # an operator's own value, even empty, stays
    grpc_core.configure(mine)
    assert mine == {grpc_core.VARIABLE: ""}


@pytest.mark.parametrize("service", ["gateway", "vision_service", "diffusion_service"])
def test_each_entry_point_runs_grpc_on_its_completion_queue_poller(service: str) -> None:
    """Run as ``python -m``, each service's sockets are gRPC's iomgr ones (the
    EventEngine's are off) and gRPC knows every experiment named."""
    env = {k: v for k, v in os.environ.items() if k != grpc_core.VARIABLE}
    env |= {"GRPC_TRACE": "tcp", "GRPC_VERBOSITY": "debug"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, service],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == ",".join(grpc_core.EXPERIMENTS)
    assert "Unknown experiment" not in done.stderr
    assert "tcp_client_posix.cc" in done.stderr  # iomgr's TCP client, not the EventEngine's
    assert "posix_interface_posix.cc" not in done.stderr
