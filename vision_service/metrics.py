"""The vision service's Prometheus metrics, on an injected registry.

vLLM hands scheduler stats to stat loggers; :meth:`VisionMetrics.stat_logger_factory`
returns one that copies the engine's queue depth and running count into
gauges here and the tokens of each engine step into a histogram, and stands
in for vLLM's own Prometheus logger (whose metrics this service would not
export); vLLM's periodic log line stays.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class VisionMetrics:
    """Counters, gauges and histograms of one vision worker."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "dreamsight_vision_requests_total",
            "Vision RPCs by method and outcome (ok or a status code name)",
            ["method", "outcome"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "dreamsight_vision_requests_in_flight", "Chat streams being served", registry=registry
        )
        self.ttft = Histogram(
            "dreamsight_vision_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "dreamsight_vision_inter_token_latency_seconds",
            "Time between generated tokens",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "dreamsight_vision_prompt_tokens_total", "Prompt tokens processed", registry=registry
        )
        self.completion_tokens = Counter(
            "dreamsight_vision_completion_tokens_total", "Tokens generated", registry=registry
        )
        self.gpu_seconds = Counter(
            "dreamsight_vision_gpu_seconds_total",
            "Accelerator busy time attributed to requests",
            registry=registry,
        )
        self.engine_waiting = Gauge(
            "dreamsight_vision_engine_queue_depth",
            "Requests waiting in the engine's scheduler",
            registry=registry,
        )
        self.engine_running = Gauge(
            "dreamsight_vision_engine_running_requests",
            "Requests the engine's scheduler is running",
            registry=registry,
        )
        self.engine_step_tokens = Histogram(
            "dreamsight_vision_engine_step_tokens",
            "Tokens per engine step, prompt and generated (vLLM's vllm:iteration_tokens_total): "
            "how full the engine's batches run",
            buckets=_STEP_TOKEN_BUCKETS,
            registry=registry,
        )

    def stat_logger_factory(self) -> Any:
        """A vLLM stat logger factory that feeds these gauges.

        To vLLM it is a ``PrometheusStatLogger``, so vLLM adds none of its own:
        that one observes a few dozen labelled histograms and counters per
        engine step and per finished request into prometheus_client's global
        registry, which this service does not export (its /metrics serves the
        injected registry). Measured on the demo model, 8 text chats at once:
        skipping that work is most of vLLM's statistics cost in this process.
        """
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        metrics = self

        class _GaugeStatLogger(PrometheusStatLogger):  # type: ignore[misc]
            def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
                self.engine_indexes = engine_indexes or [0]  # nothing of vLLM's to build

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is not None:
                    metrics.engine_waiting.set(scheduler_stats.num_waiting_reqs)
                    metrics.engine_running.set(scheduler_stats.num_running_reqs)
                if iteration_stats is not None:
                    metrics.engine_step_tokens.observe(
                        iteration_stats.prompt_token_stats.computed
                        + iteration_stats.num_generation_tokens
                    )

            def record_admission_rejection(self, reason: str) -> None:
                pass

            def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
                pass

            def log_engine_initialized(self) -> None:
                pass

            def log(self) -> None:
                pass

        return _GaugeStatLogger
