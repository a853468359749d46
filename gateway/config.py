"""The gateway's one typed settings object.

Each setting is declared once below (default, help, limits); ``--help``
lists them with their ``DREAMSIGHT_GATEWAY_*`` variables. Secrets come from
the environment or a file only, never from a flag. Built in ``main()``;
nothing is read at import time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from dreamsight_server.lifecycle import ServerOptions
from dreamsight_server.settings import group, parse, setting

MAX_REQUEST_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway needs to start."""

    ENV_PREFIX: ClassVar[str] = "DREAMSIGHT_GATEWAY_"

    vision_target: str = setting(
        "127.0.0.1:50052", "gRPC target of the vision backends, e.g. dns:///vision:50052"
    )
    diffusion_target: str = setting("127.0.0.1:50053", "gRPC target of the diffusion backends")
    tiers_file: str = setting("", "YAML file of tiers; empty: the built-in defaults")
    database: str = setting(
        ".dreamsight/gateway.sqlite3",
        "SQLite path, or a postgresql:// DSN, for the ledger and the keys",
    )
    redis_url: str = setting("", "Redis URL; with one, concurrency limits hold across replicas")
    admin_token: str = setting("", "token for AdminService; empty disables it", secret=True)
    backend_secret: str = setting(
        "", "shared secret sent to the backends (x-dreamsight-gateway-token)", secret=True
    )
    queue_length: int = setting(
        8, "requests per tenant that may wait for a slot beyond the tier's limit", minimum=0
    )
    queue_wait_s: float = setting(
        10.0,
        "seconds a queued request waits for a slot before RESOURCE_EXHAUSTED",
        flag="queue-wait",
        env="QUEUE_WAIT_SECONDS",
        minimum=0,
    )
    lease_ttl_s: float = setting(
        15.0,
        "seconds a Redis slot lease lives without a heartbeat",
        flag="lease-ttl",
        env="LEASE_TTL_SECONDS",
        minimum=1,
    )
    settle_timeout_s: float = setting(
        30.0,
        "seconds a stopped call's backend has to finish its step and report what the call "
        "spent; past it the gateway bills an estimate",
        flag="settle-timeout",
        env="SETTLE_TIMEOUT_SECONDS",
        minimum=0,
    )
    job_sweep_s: float = setting(
        5.0,
        "seconds between rounds that ask the diffusion service about unbilled DreamBooth "
        "jobs and bill those that ended, whoever watches",
        flag="job-sweep",
        env="JOB_SWEEP_SECONDS",
        minimum=0.1,
    )
    lane_calls: int = setting(
        8,
        "vision chats carried together on one stream to a vision replica, so that the "
        "tokens of several chats cross to the gateway in one message per engine step; "
        "a new stream opens when each is full; 0 gives each chat its own stream",
        minimum=0,
    )
    key_cache_ttl_s: float = 5.0
    """How long a verified key is trusted before the store is asked again."""
    budget_cache_ttl_s: float = 1.0
    """How long a tenant's window totals are reused before the ledger is asked again
    (this replica's own billing updates them at once)."""
    http_port: int | None = setting(
        11434,
        "port of the Ollama- and OpenAI-compatible HTTP API, on --host; 0 picks a free one, "
        "off (or -1) turns HTTP off",
    )
    http_chat_body_bytes: int = setting(
        32 * 1024 * 1024,
        "largest body of an HTTP chat request (/api/chat, /api/generate, "
        "/v1/chat/completions; images travel in it as base64); HTTP 413 beyond",
        minimum=1024,
    )
    http_body_bytes: int = setting(
        256 * 1024,
        "largest body of every other HTTP endpoint (image generation, model details); "
        "HTTP 413 beyond",
        minimum=1024,
    )
    http_public_models: bool = setting(
        True,
        "list the base models without a key on /api/tags, /api/ps and /v1/models (tools "
        "such as Open WebUI's Ollama connection and vllm bench serve list before they send "
        "one); fine-tuned models and every other endpoint still need the caller's key",
    )
    event_loop: str = setting(
        "uvloop", "uvloop (less CPU per proxied chunk) or asyncio", choices=("uvloop", "asyncio")
    )
    backend_tls_ca: str = setting("", "PEM CA of the backends' certificates: call them over TLS")
    backend_tls_cert: str = setting("", "PEM client certificate for mTLS to the backends")
    backend_tls_key: str = setting("", "PEM key of that client certificate")
    backend_tls_server_name: str = setting(
        "", "name to check in the backends' certificates, when not the target's host"
    )
    server: ServerOptions = group(
        lambda: ServerOptions(port=50051, metrics_port=9101, max_receive_bytes=MAX_REQUEST_BYTES)
    )


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> GatewaySettings:
    """Settings from flags, then DREAMSIGHT_GATEWAY_* variables, then the defaults."""
    settings = parse(
        GatewaySettings,
        argv,
        env,
        "python -m gateway",
        "dreamsight gateway: keys, tiers, metering, gRPC and HTTP front ends",
    )
    http_port = settings.http_port
    if http_port is not None and http_port < 0:
        http_port = None
    return replace(settings, http_port=http_port)
