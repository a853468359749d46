"""The diffusion service's Prometheus metrics, on an injected registry.

No label carries a model name, tenant or request id: fine-tuned model names
are unbounded, so models are counted, not named.

The training metric names are a contract with the Kubernetes manifests and
alert rules; rename them only together.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TRAINING_END_STATES = ("succeeded", "failed", "cancelled")


class DiffusionMetrics:
    """Counters, gauges and histograms of one diffusion worker."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "dreamsight_diffusion_requests_total",
            "Diffusion RPCs by method and outcome (ok or a status code name)",
            ["method", "outcome"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "dreamsight_diffusion_step_seconds",
            "Time of one denoising step (one batched UNet evaluation)",
            buckets=_STEP_BUCKETS,
            registry=registry,
        )
        self.generation_seconds = Histogram(
            "dreamsight_diffusion_generation_seconds",
            "Time from arrival to the last image of a finished generation",
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.images = Counter(
            "dreamsight_diffusion_images_generated_total", "Images generated", registry=registry
        )
        self.queue_depth = Gauge(
            "dreamsight_diffusion_queue_depth",
            "Generations waiting for a worker",
            registry=registry,
        )
        self.running = Gauge(
            "dreamsight_diffusion_running_requests",
            "Generations running on a worker",
            registry=registry,
        )
        self.gpu_seconds = Counter(
            "dreamsight_diffusion_gpu_seconds_total",
            "Accelerator busy time attributed to generations",
            registry=registry,
        )
        self.models_loaded = Gauge(
            "dreamsight_diffusion_models_loaded",
            "Pipelines held in memory",
            registry=registry,
        )
        self.model_loads = Counter(
            "dreamsight_diffusion_model_loads_total",
            "Pipelines loaded (a reload after eviction counts again)",
            registry=registry,
        )
        self.adapter_loads = Counter(
            "dreamsight_diffusion_adapter_loads_total",
            "LoRA adapters loaded onto a base pipeline (a reload after unloading counts again), "
            "by how: hot_swap (into an outgoing adapter's layers) or fresh (new layers)",
            ["how"],
            registry=registry,
        )
        self.training_jobs = Counter(
            "dreamsight_diffusion_training_jobs_total",
            "Training jobs that ended, by final state (succeeded, failed or cancelled)",
            ["state"],
            registry=registry,
        )
        for state in TRAINING_END_STATES:
            self.training_jobs.labels(state)
        self.training_running = Gauge(
            "dreamsight_diffusion_training_jobs_running",
            "Training jobs whose worker process is running",
            registry=registry,
        )
        self.training_queued = Gauge(
            "dreamsight_diffusion_training_jobs_queued",
            "Training jobs waiting for a worker",
            registry=registry,
        )
        self.training_steps = Counter(
            "dreamsight_diffusion_training_steps_total",
            "Optimizer steps done by training jobs (steps redone after a resume count again)",
            registry=registry,
        )
        self.training_gpu_seconds = Counter(
            "dreamsight_diffusion_training_gpu_seconds_total",
            "Accelerator time charged to training jobs (devices times worker wall time)",
            registry=registry,
        )
