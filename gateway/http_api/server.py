"""The gateway's HTTP front end: Ollama's API under /api, OpenAI's under /v1.

aiohttp serves it on the gateway's own event loop (uvloop or asyncio) beside
the gRPC server, over the same core and backend channels. aiohttp because it
needs nothing beyond the event loop already running: an ``AppRunner`` and a
``TCPSite`` start and stop inside ``start_gateway``/``Gateway.stop`` with no
second server process, no signal handling of its own, and, with handler
cancellation on, a caller's disconnect cancels its handler at once, which
cancels the upstream call and frees the slot.
"""

from __future__ import annotations

import logging

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler

from dreamsight_server.lifecycle import TlsFiles
from gateway.core import GatewayCore
from gateway.http_api import ollama, openai
from gateway.http_api.upstream import BodyLimits, Upstream

log = logging.getLogger(__name__)


async def _root(request: web.Request) -> web.Response:
    # Ollama tools probe "/" to see whether a server is up.
    return web.Response(text="dreamsight gateway: Ollama and OpenAI APIs are running")


HEALTH_PATHS = ("/health", "/healthz", "/ping", "/v1/health", "/api/health")
"""Where health-checking clients probe (vLLM's server answers /health and /ping;
guidellm checks /health); none needs a key."""


def _health(upstream: Upstream) -> Handler:
    async def health(request: web.Request) -> web.Response:
        # 200 while any backend serves (the other's calls fail on their own), else 503.
        backends = await upstream.health()
        status = (
            "ok"
            if all(backends.values())
            else "degraded"
            if any(backends.values())
            else "unavailable"
        )
        body = {
            "status": status,
            "backends": {k: "serving" if v else "not serving" for k, v in backends.items()},
        }
        return web.json_response(body, status=200 if any(backends.values()) else 503)

    return health


def build_app(upstream: Upstream) -> web.Application:
    """The application: the root probe, health, /api (Ollama) and /v1 (OpenAI)."""
    limits = upstream.body_limits  # each endpoint reads with its own limit (read_json)
    app = web.Application(client_max_size=max(limits.chat, limits.other))
    app.router.add_get("/", _root)
    for path in HEALTH_PATHS:  # before the sub-applications, so theirs do not shadow them
        app.router.add_get(path, _health(upstream))
    app.add_subapp("/api", ollama.app(upstream))
    app.add_subapp("/v1", openai.app(upstream))
    return app


class HttpServer:
    """The running HTTP front end."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite) -> None:
        self._runner = runner
        self._site = site
        self.port = int(runner.addresses[0][1])
        """The bound port."""

    async def stop(self, grace_s: float) -> None:
        """Refuse new connections, give running requests grace_s, cancel the rest."""
        await self._site.stop()
        if self._runner.server is not None:
            # aiohttp reads a timeout of 0 as "wait forever"; a tiny one cancels at once.
            await self._runner.server.shutdown(max(grace_s, 0.001))
        await self._runner.cleanup()


async def start_http(
    core: GatewayCore,
    vision: grpc.aio.Channel,
    diffusion: grpc.aio.Channel,
    host: str,
    port: int,
    body_limits: BodyLimits,
    tls: TlsFiles | None = None,
    public_models: bool = True,
) -> HttpServer:
    """Serve the HTTP APIs on host:port (0 picks a free port); HTTPS with tls;
    public_models lists the base models to callers without a key."""
    app = build_app(Upstream(core, vision, diffusion, body_limits, public_models))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls.ssl_context() if tls else None)
    await site.start()
    server = HttpServer(runner, site)
    scheme = "HTTPS" if tls else "HTTP"
    log.info("%s (Ollama /api, OpenAI /v1) on %s:%d", scheme, host, server.port)
    return server
