"""gRPC core settings every server process takes before grpc is first imported.

gRPC Python reads ``GRPC_EXPERIMENTS`` once, when its core is loaded (the first
``import grpc``), so :func:`configure` runs at the top of each service's
``__main__`` and of the test session, before anything imports grpc.

What it turns off: gRPC's EventEngine for sockets (client, listener, other
endpoints, the callback queue). With it on, as gRPC 1.85 ships, each streamed
message crosses three threads: the engine's poller reads the socket, the
completion queue's poller thread takes the event, and asyncio's loop runs the
handler. With it off, the completion queue's poller reads the sockets itself
(gRPC's iomgr, its long-standing path) and one hop goes. Measured on the 2-core
machine with 16 streams of paced 40-byte messages (``make bench-grpc-core``;
docs/benchmarks.md, "Sixth round"): the reading side's CPU per message falls
from 61-68 us to 38-44 us, the writing side's by 5-10%. A chat token crosses
one such hop between the vision service and the gateway (and one more to a
gRPC client), so this is CPU the model's forward passes get back.

An operator who sets ``GRPC_EXPERIMENTS`` (even empty) keeps their value.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

EXPERIMENTS = (
    "-event_engine_client",
    "-event_engine_listener",
    "-event_engine_for_all_other_endpoints",
    "-event_engine_callback_cq",
)
"""gRPC experiments switched off by default (names as gRPC 1.85 knows them)."""

VARIABLE = "GRPC_EXPERIMENTS"


def configure(environ: MutableMapping[str, str] | None = None) -> None:
    """Set ``GRPC_EXPERIMENTS`` (in os.environ by default) unless it is set. Call it
    before grpc is imported: after, the setting reaches only child processes."""
    env = os.environ if environ is None else environ
    env.setdefault(VARIABLE, ",".join(EXPERIMENTS))
