"""A fast streaming VisionService for the gateway benchmark (no model).

    python bench/fake_backend.py PORT

Chat streams ``chunks:N`` small deltas as fast as it can (the same fake the
gateway's tests use), then a final message, and reports GPU-seconds in the
trailer like the real backends do. ListModels is a tiny unary call.
"""

from __future__ import annotations

import asyncio
import sys

from tests.gateway_helpers import FakeBackend, FakeVision


async def main(port: int) -> None:
    backend = FakeBackend(FakeVision(gpu_seconds=0.001), port=port)
    await backend.start()
    print(f"fake backend listening on 127.0.0.1:{backend.port}", flush=True)
    assert backend.server is not None
    await backend.server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
