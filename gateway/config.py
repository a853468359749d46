"""The gateway's one typed settings object.

Built in ``main()`` from flags whose defaults come from ``DREAMSIGHT_GATEWAY_*``
environment variables (secrets only from the environment); nothing is read at
import time.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dreamsight_server.lifecycle import ServerOptions, add_tls_arguments, tls_from_arguments


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway needs to start."""

    vision_target: str = "127.0.0.1:50052"
    """gRPC target of the vision backends, e.g. ``dns:///vision:50052`` (round-robin)."""
    diffusion_target: str = "127.0.0.1:50053"
    tiers_file: str = ""
    """YAML file of tiers; empty uses the built-in defaults (DESIGN.md)."""
    database: str = ".dreamsight/gateway.sqlite3"
    """SQLite path, or a ``postgresql://`` DSN for the ledger, keys and jobs."""
    redis_url: str = ""
    """With a Redis URL, concurrency limits hold across gateway replicas."""
    admin_token: str = ""
    """Token for AdminService; empty disables AdminService."""
    backend_secret: str = ""
    """Shared secret sent to backends with the tenant (x-dreamsight-gateway-token)."""
    queue_length: int = 8
    """Requests per tenant that may wait for a slot beyond the tier's limit."""
    queue_wait_s: float = 10.0
    """How long a queued request waits for a slot before RESOURCE_EXHAUSTED."""
    lease_ttl_s: float = 15.0
    """Redis slot leases expire after this long without a heartbeat."""
    key_cache_ttl_s: float = 5.0
    """How long a verified key is trusted before the store is asked again."""
    budget_cache_ttl_s: float = 1.0
    """How long a tenant's window totals are reused before the ledger is asked again
    (this replica's own billing updates them at once)."""
    http_port: int | None = 11434
    """Port of the Ollama- and OpenAI-compatible HTTP API (Ollama's own port by
    default), on the gRPC host; 0 picks a free port, None turns HTTP off."""
    event_loop: str = "uvloop"
    """``uvloop`` (less CPU per proxied chunk) or ``asyncio``."""
    backend_tls_ca: str = ""
    """PEM CA that signed the backends' certificates; set to call backends over TLS."""
    backend_tls_cert: str = ""
    """PEM client certificate for mTLS to the backends (with backend_tls_key)."""
    backend_tls_key: str = ""
    backend_tls_server_name: str = ""
    """Name to check in the backends' certificates, when it is not the target host."""
    server: ServerOptions = field(
        default_factory=lambda: ServerOptions(port=50051, max_receive_bytes=100 * 1024 * 1024)
    )


def _env(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(f"DREAMSIGHT_GATEWAY_{name}", default)


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> GatewaySettings:
    """Settings from flags, defaulting to DREAMSIGHT_GATEWAY_* variables."""
    env = os.environ if env is None else env
    d = GatewaySettings()
    p = argparse.ArgumentParser(prog="python -m gateway", description="dreamsight gateway")
    p.add_argument("--vision-target", default=_env(env, "VISION_TARGET", d.vision_target))
    p.add_argument("--diffusion-target", default=_env(env, "DIFFUSION_TARGET", d.diffusion_target))
    p.add_argument("--tiers-file", default=_env(env, "TIERS_FILE", ""))
    p.add_argument("--database", default=_env(env, "DATABASE", d.database))
    p.add_argument("--redis-url", default=_env(env, "REDIS_URL", ""))
    p.add_argument("--queue-length", type=int, default=int(_env(env, "QUEUE_LENGTH", "8")))
    p.add_argument("--queue-wait", type=float, default=float(_env(env, "QUEUE_WAIT_SECONDS", "10")))
    p.add_argument("--lease-ttl", type=float, default=float(_env(env, "LEASE_TTL_SECONDS", "15")))
    p.add_argument(
        "--event-loop", choices=["uvloop", "asyncio"], default=_env(env, "EVENT_LOOP", "uvloop")
    )
    add_tls_arguments(p, lambda name, default: _env(env, name, default))
    p.add_argument("--backend-tls-ca", default=_env(env, "BACKEND_TLS_CA", ""))
    p.add_argument("--backend-tls-cert", default=_env(env, "BACKEND_TLS_CERT", ""))
    p.add_argument("--backend-tls-key", default=_env(env, "BACKEND_TLS_KEY", ""))
    p.add_argument("--backend-tls-server-name", default=_env(env, "BACKEND_TLS_SERVER_NAME", ""))
    p.add_argument("--host", default=_env(env, "HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env(env, "PORT", "50051")))
    p.add_argument(
        "--http-port",
        type=int,
        default=int(_env(env, "HTTP_PORT", "11434")),
        help="Ollama/OpenAI-compatible HTTP port; 0 picks a free one, -1 turns HTTP off",
    )
    p.add_argument("--metrics-port", type=int, default=int(_env(env, "METRICS_PORT", "9101")))
    p.add_argument("--grace-seconds", type=float, default=float(_env(env, "GRACE_SECONDS", "30")))
    a = p.parse_args(argv)
    return GatewaySettings(
        vision_target=a.vision_target,
        diffusion_target=a.diffusion_target,
        tiers_file=a.tiers_file,
        database=a.database,
        redis_url=a.redis_url,
        # Secrets come from the environment only, never from flags (ps shows flags).
        admin_token=_env(env, "ADMIN_TOKEN", ""),
        backend_secret=_env(env, "BACKEND_SECRET", ""),
        queue_length=a.queue_length,
        queue_wait_s=a.queue_wait,
        lease_ttl_s=a.lease_ttl,
        http_port=None if a.http_port < 0 else a.http_port,
        event_loop=a.event_loop,
        backend_tls_ca=a.backend_tls_ca,
        backend_tls_cert=a.backend_tls_cert,
        backend_tls_key=a.backend_tls_key,
        backend_tls_server_name=a.backend_tls_server_name,
        server=ServerOptions(
            tls=tls_from_arguments(a),
            host=a.host,
            port=a.port,
            metrics_port=a.metrics_port,
            grace_s=a.grace_seconds,
            max_receive_bytes=100 * 1024 * 1024,
        ),
    )
