"""DreamBooth jobs: the training engine interface and its implementation.

The servicer talks only to :class:`TrainingEngine`. :class:`TrainingManager`
validates what needs the base model, stores each job in the SQLite
:class:`JobStore` (so a restart loses none), runs at most ``concurrency``
jobs at once in FIFO order, streams their events to watchers, cancels,
charges GPU-seconds, and on success moves the exported pipeline into the
artifacts directory and registers it as the owner's model.

Each running job is a worker process (``python -m
diffusion_service.dreambooth.worker JOB_DIR``), not a thread of the service:

- a kill is a real kill: a worker that dies (OOM killer, a crash in a
  native library) takes nothing of the service down, and the job resumes
  from its last checkpoint in a new worker (up to ``max_crashes`` times);
- all of a job's memory goes back to the system when it ends;
- Lightning's DDP re-launches the running script once per extra device,
  which must be the worker, never the service;
- torch's thread count and the device set are the worker's own.

The price is the worker's start-up (importing torch, diffusers and Lightning
takes seconds), small beside a fine-tuning run. The worker protocol is
described in :mod:`diffusion_service.dreambooth.worker`.

Files live in the artifacts directory (:mod:`diffusion_service.artifacts`).
When a job ends its checkpoints and instance images are deleted; its logs and
validation images stay.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import sqlite3
import sys
import time
from collections import defaultdict, deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from diffusion_service.artifacts import (
    FINE_TUNED_NAME,
    JOB_ID,
    JobFiles,
    move_into_place,
    write_images,
)
from diffusion_service.config import TrainingSettings
from diffusion_service.domain import (
    CheckpointSaved,
    ClassImagesProgress,
    JobCancelled,
    JobEvent,
    JobEventPayload,
    JobFailed,
    JobQueued,
    JobState,
    JobSucceeded,
    TrainingInput,
    TrainingJobInfo,
    TrainingSettingsView,
    TrainingStep,
    ValidationImage,
)
from diffusion_service.dreambooth.params import Defaults, JobParams, WorkerRuntime, WorkerSpec
from diffusion_service.job_store import JobStore, StoredJob
from diffusion_service.metrics import DiffusionMetrics
from diffusion_service.registry import ModelRegistry, count_tokens
from dreamsight_server.errors import (
    DreamsightError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
WORKER_MODULE = "diffusion_service.dreambooth.worker"


class TrainingEngine(Protocol):
    """What the diffusion servicer needs for DreamBooth jobs.

    Another tenant's job is NotFound everywhere, never PermissionDenied:
    callers cannot tell it from a job that does not exist.
    """

    async def create_job(
        self, request: TrainingInput, tenant: str, max_jobs: int | None
    ) -> TrainingJobInfo:
        """Queue a job (or return the tenant's job with the same client_request_id).

        ``max_jobs`` caps the tenant's queued plus running jobs
        (ResourceExhausted beyond it); None is no cap.
        """
        ...

    def get_job(self, job_id: str, tenant: str) -> TrainingJobInfo:
        """One of the tenant's jobs."""
        ...

    def list_jobs(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[TrainingJobInfo], str]:
        """A page of the tenant's jobs, newest first, and the next page's token."""
        ...

    def watch_job(self, job_id: str, tenant: str) -> AsyncGenerator[JobEvent, None]:
        """The job's history, then its events as they happen, to its last."""
        ...

    async def cancel_job(self, job_id: str, tenant: str) -> TrainingJobInfo:
        """Cancel a queued or running job; an ended job is returned as it is."""
        ...


@dataclass(frozen=True)
class AttemptRecord:
    """How one worker run of a job ended. Each is logged; the last few are kept
    (``recent``) so that tests and a debugger can see how resumption went."""

    job_id: str
    outcome: str
    """exported, shutdown (the service stopped it), cancelled, failed or crashed."""
    resumed_from: int | None
    """The step a resumed run started from (None before training began)."""
    last_step: int
    step_at_cancel: int | None
    exit_code: int | None


@dataclass
class _Worker:
    """One running worker process and what the service knows of it."""

    job: StoredJob
    devices: int
    gpu_base: float
    task: asyncio.Task[None] | None = None
    proc: asyncio.subprocess.Process | None = None
    started: float = field(default_factory=time.monotonic)
    charged: float = 0.0
    listening: bool = False
    outcome: str = ""
    reason: str = ""
    last_step: int = 0
    resumed_from: int | None = None
    step_at_cancel: int | None = None
    pending: list[str] = field(default_factory=list)
    kill_requested: bool = False


class TrainingManager:
    """A :class:`TrainingEngine` running jobs in worker processes."""

    def __init__(
        self,
        settings: TrainingSettings,
        defaults: Defaults,
        metrics: DiffusionMetrics,
        registry: ModelRegistry,
        store: JobStore,
        files: JobFiles,
    ) -> None:
        self._settings = settings
        self._defaults = defaults
        self._metrics = metrics
        self._registry = registry
        self._store = store
        self._files = files
        self._workers: dict[str, _Worker] = {}
        self._finalizing: set[str] = set()
        self._watchers: dict[str, set[asyncio.Queue[JobEvent | None]]] = defaultdict(set)
        self._create_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._runs: set[asyncio.Task[None]] = set()
        self._ready = False
        self._stopping = False
        self.recent: deque[AttemptRecord] = deque(maxlen=32)

    # Lifecycle.

    async def start(self) -> None:
        """Restore fine-tuned models, requeue interrupted jobs, start the queue.

        Call once the registry knows its base models.
        """
        restored = await asyncio.to_thread(self._registry.restore)
        if restored:
            log.info("restored %d fine-tuned models", restored)
        for job in self._store.in_state(JobState.RUNNING):
            # Its worker died with the previous service; resume it first in line.
            self._publish(job.job_id, JobState.QUEUED, JobQueued(self._store.queue_position(job)))
        self._ready = True
        self._refresh_queued()
        self._kick()

    async def shutdown(self) -> None:
        """Ask every worker to checkpoint and stop; kill those that overstay.

        Their jobs stay RUNNING in the store and resume at the next start.
        Watch streams end with UNAVAILABLE.
        """
        self._ready = False
        self._stopping = True
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(None)
        workers = list(self._workers.values())
        for worker in workers:
            self._command(worker, "shutdown")
        tasks = [w.task for w in workers if w.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._settings.stop_grace_s)
            for worker in workers:
                if worker.task in late:
                    log.warning(
                        "training job %s did not stop in time; killing it", worker.job.job_id
                    )
                    self._kill(worker)
            if late:
                await asyncio.wait(late, timeout=10)
        # Jobs whose worker is gone but which are still being ended (a model
        # being registered) finish that first.
        for pending in (self._runs, self._background):
            if pending:
                await asyncio.wait(pending, timeout=10)
        self._store.close()

    def worker_pid(self, job_id: str) -> int | None:
        """The worker process of a running job (the chaos tests kill it)."""
        worker = self._workers.get(job_id)
        return worker.proc.pid if worker and worker.proc else None

    @property
    def running(self) -> int:
        """Jobs whose worker process is alive."""
        return len(self._workers)

    def _check_ready(self) -> None:
        if not self._ready:
            raise Unavailable("the diffusion service is not ready for training jobs; retry shortly")

    # The API.

    async def create_job(
        self, request: TrainingInput, tenant: str, max_jobs: int | None
    ) -> TrainingJobInfo:
        self._check_ready()
        async with self._create_lock:
            if request.client_request_id:
                existing = self._store.find_by_request(tenant, request.client_request_id)
                if existing is not None:
                    return self._info(existing)
            job_id = secrets.token_urlsafe(16)
            params, name = self._resolve(request, tenant, job_id)
            if max_jobs is not None:
                active = self._store.count_active(tenant)
                if active >= max_jobs:
                    raise ResourceExhausted(
                        f"{active} of this tenant's training jobs are queued or running; its "
                        f"limit is {max_jobs} at once. Wait for one to end or cancel one.",
                        quota_subject="training_jobs",
                        quota_description=f"at most {max_jobs} training jobs queued or running",
                    )
            job_dir = self._files.job_dir(job_id)
            await asyncio.to_thread(write_images, job_dir / "instance", request.instance_images)
            ahead = self._store.count_state(JobState.QUEUED)
            try:
                self._store.insert_job(
                    job_id, tenant, request.client_request_id, params, name, JobQueued(ahead)
                )
            except BaseException:
                await asyncio.to_thread(shutil.rmtree, job_dir, True)
                raise
        log.info("training job %s queued for tenant %s (model %s)", job_id, tenant, name)
        self._refresh_queued()
        self._kick()
        return self._info(self._job(job_id))

    def get_job(self, job_id: str, tenant: str) -> TrainingJobInfo:
        self._check_ready()
        return self._info(self._owned(job_id, tenant))

    def list_jobs(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[TrainingJobInfo], str]:
        self._check_ready()
        size = page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"{size} is outside 0 to {MAX_PAGE_SIZE}")
        before = _parse_token(page_token) if page_token else None
        jobs = self._store.list_jobs(tenant, size + 1, before)
        token = _make_token(jobs[size - 1].seq) if len(jobs) > size else ""
        return [self._info(j) for j in jobs[:size]], token

    async def watch_job(self, job_id: str, tenant: str) -> AsyncGenerator[JobEvent, None]:
        self._check_ready()
        self._owned(job_id, tenant)
        queue: asyncio.Queue[JobEvent | None] = asyncio.Queue()
        # Subscribe and read the history in one go (no await in between), so
        # no event falls between the two; duplicates are skipped by seq.
        self._watchers[job_id].add(queue)
        try:
            last = 0
            for event in self._store.events(job_id):
                last = event.seq
                yield event
                if event.terminal:
                    return
            while True:
                item = await queue.get()
                if item is None:
                    raise Unavailable("the diffusion service is restarting; watch the job again")
                if item.seq <= last:
                    continue
                last = item.seq
                yield item
                if item.terminal:
                    return
        finally:
            self._watchers[job_id].discard(queue)
            if not self._watchers[job_id]:
                del self._watchers[job_id]

    async def cancel_job(self, job_id: str, tenant: str) -> TrainingJobInfo:
        self._check_ready()
        job = self._owned(job_id, tenant)
        if job.state.terminal or job_id in self._finalizing:
            return self._info(job)
        worker = self._workers.get(job_id)
        self._end(job, JobState.CANCELLED, JobCancelled(), reason="cancelled by its owner")
        if worker is not None:
            worker.step_at_cancel = worker.last_step
            if worker.listening:
                self._command(worker, "cancel")
                self._spawn(self._kill_later(worker, self._settings.cancel_grace_s))
            else:
                self._kill(worker)  # still starting up: nothing to stop gracefully
        return self._info(self._job(job_id))

    # Validation that needs the model.

    def _resolve(self, request: TrainingInput, tenant: str, job_id: str) -> tuple[JobParams, str]:
        entry = self._registry.resolve(request.base_model, tenant)
        for name, text in (
            ("instance_prompt", request.instance_prompt),
            ("class_prompt", request.class_prompt),
            ("validation_prompt", request.validation_prompt),
        ):
            if text:
                tokens = count_tokens(entry, text)
                if tokens > entry.description.max_tokens:
                    raise InvalidArgument(
                        f"spec.{name}",
                        f"{tokens} tokens, over the model's limit of "
                        f"{entry.description.max_tokens} (start and end tokens included)",
                    )
        d, limits = self._defaults, self._settings.limits
        resolution = request.resolution or d.resolution or entry.info.default_width
        if not limits.min_resolution <= resolution <= limits.max_resolution or resolution % 8:
            raise InvalidArgument(
                "spec.resolution",
                f"{resolution} (the model's default) is not a multiple of 8 from "
                f"{limits.min_resolution} to {limits.max_resolution}; set one",
            )
        name = request.output_model_name or _default_name(entry.info.name, job_id)
        if not FINE_TUNED_NAME.fullmatch(name):
            raise InvalidArgument(
                "spec.output_model_name",
                f"{name!r} must be 1 to 100 letters, digits or ._- starting with a letter or digit",
            )
        # Names are per tenant: only a base model, the tenant's own models and
        # its own active jobs take one (another tenant's never shows here).
        if self._registry.get(name, tenant) is not None or self._store.name_reserved(name, tenant):
            raise FailedPrecondition(
                f"spec.output_model_name: a model named {name!r} exists or another job will create "
                "it; choose another name"
            )
        steps = request.max_train_steps or d.max_train_steps
        params = JobParams(
            base_model=entry.info.name,
            instance_prompt=request.instance_prompt,
            class_prompt=request.class_prompt,
            validation_prompt=request.validation_prompt,
            num_class_images=request.num_class_images,
            prior_loss_weight=request.prior_loss_weight or d.prior_loss_weight,
            max_train_steps=steps,
            learning_rate=request.learning_rate or d.learning_rate,
            train_text_encoder=request.train_text_encoder,
            resolution=resolution,
            seed=request.seed,
            checkpoint_interval=request.checkpoint_interval or d.checkpoint_interval,
            num_instance_images=len(request.instance_images),
            trainer=d.trainer,
            class_images=d.class_images,
            validation=d.validation,
        )
        return params, name

    # Reading jobs.

    def _job(self, job_id: str) -> StoredJob:
        job = self._store.get(job_id)
        if job is None:
            raise NotFound(f"training job {job_id!r} not found")
        return job

    def _owned(self, job_id: str, tenant: str) -> StoredJob:
        job = self._store.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None or job.tenant != tenant:
            raise NotFound(f"training job {job_id!r} not found")
        return job

    def _info(self, job: StoredJob) -> TrainingJobInfo:
        gpu = job.gpu_seconds
        worker = self._workers.get(job.job_id)
        if worker is not None and not job.state.terminal:
            gpu = worker.gpu_base + worker.devices * (time.monotonic() - worker.started)
        return TrainingJobInfo(
            job_id=job.job_id,
            owner=job.tenant,
            state=job.state,
            settings=TrainingSettingsView(**_shown(job.params), output_model_name=job.model_name),
            step=job.step,
            create_time=job.create_time,
            end_time=job.end_time,
            model=job.model,
            reason=job.reason,
            gpu_seconds=gpu,
        )

    # Events and state changes.

    def _publish(
        self, job_id: str, state: JobState, payload: JobEventPayload, **fields: Any
    ) -> JobEvent:
        event = self._store.record(job_id, state, payload, **fields)
        for queue in self._watchers.get(job_id, ()):
            queue.put_nowait(event)
        return event

    def _end(
        self,
        job: StoredJob,
        state: JobState,
        payload: JobEventPayload,
        model: str = "",
        reason: str = "",
    ) -> None:
        """Move a job to a terminal state (once) and clean up when no worker is left."""
        self._publish(job.job_id, state, payload, model=model, reason=reason, end_time=time.time())
        self._metrics.training_jobs.labels(state.value).inc()
        log.info("training job %s %s%s", job.job_id, state.value, f": {reason}" if reason else "")
        self._refresh_queued()
        if job.job_id not in self._workers:
            self._spawn(asyncio.to_thread(self._clean_up, job.job_id))

    def _clean_up(self, job_id: str) -> None:
        """Delete what an ended job no longer needs: checkpoints (large),
        instance images (the owner's photos) and any half-made export."""
        job_dir = self._files.job_dir(job_id)
        for path in (
            job_dir / "checkpoints",
            job_dir / "instance",
            self._files.partial_export(job_id),
        ):
            shutil.rmtree(path, ignore_errors=True)

    def _refresh_queued(self) -> None:
        self._metrics.training_queued.set(self._store.count_state(JobState.QUEUED))

    def _spawn(self, awaitable: Any) -> None:
        task = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # Running jobs.

    def _kick(self) -> None:
        """Start queued jobs, oldest first, while there are free slots."""
        if not self._ready or self._stopping:
            return
        queued = [j for j in self._store.in_state(JobState.QUEUED) if j.job_id not in self._workers]
        for job in queued[: max(0, self._settings.concurrency - len(self._workers))]:
            self._launch(job)

    def _launch(self, job: StoredJob) -> None:
        s = self._settings
        self._store.update(
            job.job_id,
            state=JobState.RUNNING,
            attempts=job.attempts + 1,
            start_time=job.start_time or time.time(),
        )
        worker = _Worker(job=job, devices=s.devices, gpu_base=job.gpu_seconds)
        self._workers[job.job_id] = worker
        self._metrics.training_running.set(len(self._workers))
        self._refresh_queued()
        worker.task = asyncio.create_task(self._run(worker), name=f"training-{job.job_id}")
        self._runs.add(worker.task)
        worker.task.add_done_callback(self._runs.discard)

    async def _run(self, worker: _Worker) -> None:
        job = worker.job
        code: int | None = None
        try:
            code = await self._run_process(worker)
        except DreamsightError as error:
            worker.outcome, worker.reason = "failed", error.message
        except Exception:
            log.exception("training job %s: the worker could not run", job.job_id)
        finally:
            self._charge(worker)
            del self._workers[job.job_id]
            self._metrics.training_running.set(len(self._workers))
        try:
            await self._after_exit(worker, code)
        except Exception:
            log.exception("training job %s: ending it failed", job.job_id)
        self._kick()

    async def _run_process(self, worker: _Worker) -> int:
        job, s = worker.job, self._settings
        job_dir = self._files.job_dir(job.job_id)
        entry = self._registry.get(job.params.base_model, job.tenant)
        if entry is None:
            raise NotFound(f"base model {job.params.base_model!r} is no longer served")
        runtime = WorkerRuntime(
            job_id=job.job_id,
            base_source=entry.source,
            instance_dir=str(job_dir / "instance"),
            class_cache_dir=str(self._files.class_images),
            export_dir=str(self._files.partial_export(job.job_id)),
            accelerator=s.accelerator,
            devices=s.devices,
            strategy=s.strategy,
            torch_threads=s.torch_threads,
        )
        await asyncio.to_thread(WorkerSpec(job.params, runtime).write, job_dir / "job.json")
        env = {**os.environ, "OMP_NUM_THREADS": str(s.torch_threads)}
        with (job_dir / "worker.log").open("ab") as log_file:
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                WORKER_MODULE,
                str(job_dir),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=env,
                start_new_session=True,  # its own process group: DDP ranks die with it
                limit=1 << 20,
            )
        worker.started = time.monotonic()
        log.info("training job %s: worker %d started", job.job_id, worker.proc.pid)
        if worker.kill_requested:
            self._kill(worker)
        for command in worker.pending:
            self._command(worker, command)
        assert worker.proc.stdout is not None
        async for line in worker.proc.stdout:
            try:
                self._on_event(worker, json.loads(line))
            except (ValueError, KeyError, TypeError):
                log.warning("training job %s: bad worker line %r", job.job_id, line[:200])
        return await worker.proc.wait()

    def _on_event(self, worker: _Worker, event: dict[str, Any]) -> None:
        kind = event["event"]
        job_id = worker.job.job_id
        if kind == "started":
            worker.listening = True
            return
        if kind in ("training", "resumed"):
            worker.resumed_from = int(event["step"])
            return
        if kind in ("exported", "stopped", "failed"):
            worker.outcome = event.get("why", kind) if kind == "stopped" else kind
            worker.reason = str(event.get("reason", ""))
            return
        job = self._store.get(job_id)
        if job is None or job.state.terminal:
            return  # a cancelled job's worker finishing its step: nobody wants it
        payload: JobEventPayload
        fields: dict[str, Any] = {}
        if kind == "class_images":
            payload = ClassImagesProgress(int(event["done"]), int(event["total"]))
        elif kind == "step":
            step = int(event["step"])
            worker.last_step = step
            self._metrics.training_steps.inc()
            fields = {"step": step, "gpu_seconds": self._charge(worker)}
            payload = TrainingStep(
                step=step,
                total_steps=int(event["total"]),
                loss=_number(event.get("loss")),
                learning_rate=_number(event.get("lr")),
                eta_s=_number(event.get("eta_s")),
            )
        elif kind == "checkpoint":
            payload = CheckpointSaved(int(event["step"]))
        elif kind == "validation":
            path = self._files.job_dir(job_id) / str(event["path"])
            if path.parent.parent != self._files.job_dir(job_id):
                return
            payload = ValidationImage(int(event["step"]), path.read_bytes())
        else:
            return
        self._publish(job_id, JobState.RUNNING, payload, **fields)

    def _charge(self, worker: _Worker) -> float:
        """The job's GPU-seconds so far: devices times its workers' wall time."""
        total = worker.gpu_base + worker.devices * (time.monotonic() - worker.started)
        self._metrics.training_gpu_seconds.inc(max(0.0, total - worker.gpu_base - worker.charged))
        worker.charged = total - worker.gpu_base
        return total

    async def _after_exit(self, worker: _Worker, code: int | None) -> None:
        job = self._job(worker.job.job_id)
        gpu = worker.gpu_base + worker.charged
        outcome = worker.outcome or "crashed"
        if job.state is JobState.CANCELLED:
            outcome = "cancelled"
        self.recent.append(
            AttemptRecord(
                job.job_id, outcome, worker.resumed_from, worker.last_step,
                worker.step_at_cancel, code,
            )
        )  # fmt: skip
        log.info(
            "training job %s: worker exited %s (%s) at step %d",
            job.job_id, code, outcome, worker.last_step,
        )  # fmt: skip
        if job.state.terminal:
            self._store.update(job.job_id, gpu_seconds=gpu)
            await asyncio.to_thread(self._clean_up, job.job_id)
            return
        if self._stopping:
            self._store.update(job.job_id, gpu_seconds=gpu)  # stays RUNNING: resumes at start
            return
        if outcome == "exported" and code == 0:
            self._store.update(job.job_id, gpu_seconds=gpu)
            await self._succeed(job)
            return
        if outcome == "failed":
            self._store.update(job.job_id, gpu_seconds=gpu)
            self._end(job, JobState.FAILED, JobFailed(worker.reason), reason=worker.reason)
            return
        crashes = job.crashes + 1
        if crashes > self._settings.max_crashes:
            reason = f"the training worker stopped unexpectedly {crashes} times"
            self._store.update(job.job_id, gpu_seconds=gpu, crashes=crashes)
            self._end(job, JobState.FAILED, JobFailed(reason), reason=reason)
            return
        log.warning("training job %s: worker died; resuming from its last checkpoint", job.job_id)
        self._publish(
            job.job_id,
            JobState.QUEUED,
            JobQueued(self._store.queue_position(job)),
            gpu_seconds=gpu,
            crashes=crashes,
        )
        self._refresh_queued()

    async def _succeed(self, job: StoredJob) -> None:
        """Move the export into place, register it, then mark the job done."""
        self._finalizing.add(job.job_id)
        name = job.model_name
        final = self._files.model_dir(_model_dir_name(name, job.job_id))
        try:
            registered = self._registry.get(name, job.tenant)
            if registered is None or registered.info.job_id != job.job_id:
                partial = self._files.partial_export(job.job_id)
                await asyncio.to_thread(move_into_place, partial, final)
                try:
                    await asyncio.to_thread(
                        self._registry.register_fine_tuned,
                        name,
                        final,
                        job.tenant,
                        job.params.base_model,
                        job.job_id,
                    )
                except BaseException:
                    await asyncio.to_thread(shutil.rmtree, final, True)
                    raise
            self._end(job, JobState.SUCCEEDED, JobSucceeded(name), model=name)
        except DreamsightError as error:
            self._end(job, JobState.FAILED, JobFailed(error.message), reason=error.message)
        except (OSError, sqlite3.Error):
            log.exception("training job %s: registering the model failed", job.job_id)
            reason = "the trained model could not be saved"
            self._end(job, JobState.FAILED, JobFailed(reason), reason=reason)
        finally:
            self._finalizing.discard(job.job_id)

    # Talking to workers.

    def _command(self, worker: _Worker, command: str) -> None:
        proc = worker.proc
        if proc is None:
            worker.pending.append(command)
            return
        if proc.stdin is None or proc.returncode is not None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            proc.stdin.write(f"{command}\n".encode())

    def _kill(self, worker: _Worker) -> None:
        proc = worker.proc
        if proc is None:
            worker.kill_requested = True  # killed as soon as it exists
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    async def _kill_later(self, worker: _Worker, delay_s: float) -> None:
        if worker.task is None:
            return
        _, late = await asyncio.wait({worker.task}, timeout=delay_s)
        if late:
            log.warning("training job %s: worker ignored the cancel; killing it", worker.job.job_id)
            self._kill(worker)


def _shown(params: JobParams) -> dict[str, Any]:
    """The job parameters a TrainingSettingsView reports, by field name."""
    named = {f.name for f in fields(TrainingSettingsView)} - {"output_model_name"}
    return {name: getattr(params, name) for name in named}


def _model_dir_name(name: str, job_id: str) -> str:
    """The directory of the model a job exports: unique per job (it ends in the
    22-character job id), since two tenants may each own a model of one name."""
    return f"{name[:70]}-{job_id}"


def _default_name(base_model: str, job_id: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base_model).strip("-.") or "model"
    return f"{base[:60]}-{job_id[:10]}"


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _make_token(seq: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"before": seq}).encode()).decode().rstrip("=")


def _parse_token(token: str) -> int:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        before = data["before"]
        if isinstance(before, int) and not isinstance(before, bool) and before > 0:
            return before
    except (ValueError, KeyError, TypeError, binascii.Error):
        pass
    raise InvalidArgument("page_token", "not a token from a previous ListTrainingJobs response")
