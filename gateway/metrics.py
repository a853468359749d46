"""The gateway's Prometheus metrics, on an injected registry.

Labels are bounded: service, method, status code, tier (operator-defined,
few), front-end protocol (grpc, ollama, openai) and rejection reason. Never
a key, tenant or request id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)


class GatewayMetrics:
    """Everything the gateway exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "dreamsight_gateway_requests_total",
            "Requests by service, method, final status code, tier and front-end protocol",
            ["service", "method", "code", "tier", "protocol"],
            registry=registry,
        )
        self.latency = Histogram(
            "dreamsight_gateway_request_duration_seconds",
            "Time from admission to the end of the call",
            ["service", "method"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.first_chunk = Histogram(
            "dreamsight_gateway_time_to_first_chunk_seconds",
            "Time from arrival to the first streamed message (time to first token for Chat)",
            ["service", "method"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "dreamsight_gateway_requests_in_flight",
            "Admitted requests still running, by tier",
            ["tier"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "dreamsight_gateway_queue_wait_seconds",
            "Time admitted requests waited for a concurrency slot",
            ["tier"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.rejections = Counter(
            "dreamsight_gateway_rejections_total",
            "Requests refused before reaching a backend, by reason and tier (none when unknown)",
            ["reason", "tier"],
            registry=registry,
        )
        self.gpu_seconds = Counter(
            "dreamsight_gateway_gpu_seconds_total",
            "GPU-seconds billed, by tier and service",
            ["tier", "service"],
            registry=registry,
        )
        self.billing_failures = Counter(
            "dreamsight_gateway_billing_failures_total",
            "Calls whose GPU-seconds could not be written to the ledger (logged with the amount)",
            registry=registry,
        )
