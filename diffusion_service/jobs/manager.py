"""DreamBooth jobs on one replica of the training plane.

:class:`TrainingManager` is the :class:`~diffusion_service.jobs.engine.TrainingEngine`
the servicer talks to. Every replica sharing a job store
(:mod:`diffusion_service.jobs.store`) answers Create, Get, List, Watch and
Cancel for every job; a replica with training slots (``--training-concurrency``
above 0) also runs them:

- it claims queued jobs up to its slots, oldest first, each under a lease
  it renews while the job trains; a replica that dies lets its leases lapse
  and another one claims the job and resumes it from its last checkpoint on
  the shared artifacts directory (the same step count and schedule: the
  checkpoint holds the optimizer and LR scheduler). Claims are atomic in the
  store, so a job never has two runners; a replica that finds its lease gone
  (the job was cancelled elsewhere, or taken over while this replica was cut
  off) kills its worker and writes nothing more;
- each running job is a worker process
  (:mod:`diffusion_service.jobs.worker_process`), not a thread: a kill is a
  real kill, all of a job's memory goes back when it ends, Lightning's DDP
  re-launches the worker (never the service) per extra device, and torch's
  thread count and devices are the worker's own. A worker that dies resumes
  from its last checkpoint in a new one (up to ``max_crashes`` times, a lost
  replica counting as a crash);
- events are written to the store in order; the store tells every replica
  of each change (PostgreSQL NOTIFY), so a watcher anywhere reads what is new
  as it happens, and a cancel anywhere reaches the replica running the job,
  which stops its worker after the running step.

On success the exported pipeline is moved into the artifacts directory and
registered as the owner's model (in the store, so every replica finds it).
When a job ends its checkpoints and instance images are deleted; its logs
and validation images stay.
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
import secrets
import shutil
import socket
import time
from collections import defaultdict, deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, fields
from typing import Any

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
    TuneKind,
    ValidationImage,
)
from diffusion_service.dreambooth.params import Defaults, JobParams, WorkerRuntime, WorkerSpec
from diffusion_service.jobs.artifacts import JOB_ID, JobFiles, move_into_place, write_images
from diffusion_service.jobs.params_check import resolve_params
from diffusion_service.jobs.store import (
    Change,
    Claimed,
    DuplicateRequest,
    JobStore,
    NameTaken,
    StoredJob,
    TooManyJobs,
)
from diffusion_service.jobs.worker_events import (
    CheckpointWritten,
    ClassImagesDrawn,
    Exported,
    Failed,
    StepFinished,
    Stopped,
    TrainingBegan,
    ValidationRendered,
    WorkerEvent,
    WorkerStarted,
)
from diffusion_service.jobs.worker_process import WorkerRun
from diffusion_service.metrics import DiffusionMetrics
from diffusion_service.registry import ModelRegistry
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
WATCH_RECHECK_S = 5.0
"""A watcher rereads the store this often even without news (a notification
lost with a connection costs at most this delay, never an event)."""


@dataclass(frozen=True)
class AttemptRecord:
    """How one worker run of a job ended on this replica. Each is logged; the
    last few are kept (``recent``) so tests and a debugger can see how
    resumption went."""

    job_id: str
    outcome: str
    """exported, shutdown (the service stopped it), cancelled, failed, crashed or lost."""
    resumed_from: int | None
    """The step a resumed run started from (None before training began)."""
    last_step: int
    step_at_cancel: int | None
    exit_code: int | None


class TrainingManager:
    """A :class:`~diffusion_service.jobs.engine.TrainingEngine` on one replica."""

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
        self.replica = settings.replica_id or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self._workers: dict[str, WorkerRun] = {}
        self._finalizing: set[str] = set()
        self._watchers: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._background: set[asyncio.Task[Any]] = set()
        self._runs: set[asyncio.Task[None]] = set()
        self._lease_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False
        self._stopping = False
        self.recent: deque[AttemptRecord] = deque(maxlen=32)

    # Lifecycle.

    async def start(self) -> None:
        """Restore fine-tuned models, start listening and claiming.

        Call once the registry knows its base models.
        """
        self._loop = asyncio.get_running_loop()
        restored = await asyncio.to_thread(self._registry.refresh)
        if restored:
            log.info("restored %d fine-tuned models", restored)
        for job in self._store.in_state(JobState.RUNNING):
            # A job whose worker died with our previous process (a store of
            # one replica, or one leased under our fixed --training-replica-id):
            # requeue it, first in line, rather than wait out its lease.
            if not self._store.shared or job.lease_owner == self.replica:
                self._publish(
                    job.job_id,
                    JobState.QUEUED,
                    JobQueued(self._store.queue_position(job)),
                    lease_owner=None,
                    lease_expires=None,
                )
        self._store.subscribe(self._heard)
        self._ready = True
        self._refresh_queued()
        self._lease_task = asyncio.create_task(self._keep_leases(), name="training-leases")
        self._kick()

    async def shutdown(self) -> None:
        """Ask every worker to checkpoint and stop; kill those that overstay.

        Their jobs go back to the queue, for another replica (or this one's
        next start) to resume. Watch streams end with UNAVAILABLE.
        """
        self._ready = False
        self._stopping = True
        if self._lease_task is not None:
            self._lease_task.cancel()
        for events in self._watchers.values():
            for event in events:
                event.set()
        workers = list(self._workers.values())
        for worker in workers:
            worker.command("shutdown")
        tasks = [w.task for w in workers if w.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._settings.stop_grace_s)
            for worker in workers:
                if worker.task in late:
                    log.warning("training job %s did not stop in time; killing it", worker.job_id)
                    worker.kill()
            if late:
                await asyncio.wait(late, timeout=10)
        # Jobs whose worker is gone but which are still being ended (a model
        # being registered) finish that first.
        for pending in (self._runs, self._background):
            if pending:
                await asyncio.wait(pending, timeout=10)
        self._store.close()

    def worker_pid(self, job_id: str) -> int | None:
        """The worker process of a job running here (the chaos tests kill it)."""
        worker = self._workers.get(job_id)
        return worker.proc.pid if worker and worker.proc else None

    @property
    def running(self) -> int:
        """Jobs whose worker process is alive on this replica."""
        return len(self._workers)

    def _check_ready(self) -> None:
        if not self._ready:
            raise Unavailable("the diffusion service is not ready for training jobs; retry shortly")

    # The API.

    async def create_job(
        self, request: TrainingInput, tenant: str, max_jobs: int | None
    ) -> TrainingJobInfo:
        self._check_ready()
        if request.client_request_id:
            existing = self._store.find_by_request(tenant, request.client_request_id)
            if existing is not None:
                return self._info(existing)
        job_id = secrets.token_urlsafe(16)
        params, name = resolve_params(
            request,
            tenant,
            job_id,
            self._registry,
            self._store,
            self._defaults,
            self._settings.limits,
        )
        job_dir = self._files.job_dir(job_id)
        await asyncio.to_thread(write_images, job_dir / "instance", request.instance_images)
        ahead = self._store.count_state(JobState.QUEUED)
        try:
            self._store.insert_job(
                job_id,
                tenant,
                request.client_request_id,
                params,
                name,
                JobQueued(ahead),
                max_jobs,
            )
        except TooManyJobs as error:
            await asyncio.to_thread(shutil.rmtree, job_dir, True)
            raise ResourceExhausted(
                f"{error.active} of this tenant's training jobs are queued or running; its "
                f"limit is {max_jobs} at once. Wait for one to end or cancel one.",
                quota_subject="training_jobs",
                quota_description=f"at most {max_jobs} training jobs queued or running",
            ) from None
        except NameTaken:
            await asyncio.to_thread(shutil.rmtree, job_dir, True)
            raise FailedPrecondition(
                f"spec.output_model_name: a model named {name!r} exists or another job will "
                "create it; choose another name"
            ) from None
        except DuplicateRequest:
            # Another replica created it a moment ago: that one is the job.
            await asyncio.to_thread(shutil.rmtree, job_dir, True)
            existing = self._store.find_by_request(tenant, request.client_request_id)
            if existing is None:
                raise
            return self._info(existing)
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
        news = asyncio.Event()
        self._watchers[job_id].add(news)
        try:
            last = 0
            while True:
                # Cleared before reading: news that lands while we read is
                # not lost, it only costs one more (empty) read.
                news.clear()
                for event in self._store.events(job_id, last):
                    last = event.seq
                    yield event
                    if event.terminal:
                        return
                if self._stopping:
                    raise Unavailable("the diffusion service is restarting; watch the job again")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(news.wait(), WATCH_RECHECK_S)
        finally:
            self._watchers[job_id].discard(news)
            if not self._watchers[job_id]:
                del self._watchers[job_id]

    async def cancel_job(self, job_id: str, tenant: str) -> TrainingJobInfo:
        self._check_ready()
        job = self._owned(job_id, tenant)
        if job.state.terminal or job_id in self._finalizing:
            return self._info(job)
        worker = self._workers.get(job_id)
        if worker is not None:
            worker.step_at_cancel = worker.last_step
        # The replica running it (this one or another) hears of it and stops it.
        self._end(job, JobState.CANCELLED, JobCancelled(), reason="cancelled by its owner")
        if worker is not None:
            self._stop_cancelled(worker)
        return self._info(self._job(job_id))

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
            gpu = worker.gpu_seconds()
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
        self,
        job_id: str,
        state: JobState,
        payload: JobEventPayload,
        holder: str | None = None,
        **fields: Any,
    ) -> JobEvent | None:
        event = self._store.record(job_id, state, payload, holder=holder, **fields)
        self._poke(job_id)
        return event

    def _poke(self, job_id: str) -> None:
        for news in self._watchers.get(job_id, ()):
            news.set()

    def _heard(self, change: Change) -> None:
        """A change on some replica (called from the store's thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_change, change)

    def _on_change(self, change: Change) -> None:
        if not change.job_id:  # changes may have been missed: look at everything
            for job_id in list(self._watchers):
                self._poke(job_id)
            self._kick()
            return
        self._poke(change.job_id)
        worker = self._workers.get(change.job_id)
        if worker is not None and change.state is JobState.CANCELLED:
            self._stop_cancelled(worker)
        elif change.state is JobState.QUEUED:
            self._kick()
        elif change.state is JobState.SUCCEEDED and worker is None:
            # A model trained elsewhere: serve it here too.
            self._spawn(asyncio.to_thread(self._registry.refresh))

    def _end(
        self,
        job: StoredJob,
        state: JobState,
        payload: JobEventPayload,
        model: str = "",
        reason: str = "",
        holder: str | None = None,
    ) -> bool:
        """Move a job to a terminal state (once); False when it had ended already."""
        event = self._publish(
            job.job_id,
            state,
            payload,
            holder,
            model=model,
            reason=reason,
            end_time=time.time(),
            lease_owner=None,
        )
        if event is None:
            return False
        self._metrics.training_jobs.labels(state.value).inc()
        log.info("training job %s %s%s", job.job_id, state.value, f": {reason}" if reason else "")
        self._refresh_queued()
        if job.job_id not in self._workers:
            self._spawn(asyncio.to_thread(self._clean_up, job.job_id))
        return True

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

    # Claiming and leases.

    def _kick(self) -> None:
        """Claim queued (or abandoned) jobs while this replica has free slots."""
        if not self._ready or self._stopping:
            return
        free = self._settings.concurrency - len(self._workers)
        if free <= 0:
            return
        claimed = self._store.claim(self.replica, self._settings.lease_s, free)
        for claim in claimed:
            if claim.job.job_id not in self._workers:
                self._launch(claim)
        if claimed:
            self._refresh_queued()

    async def _keep_leases(self) -> None:
        """Renew this replica's leases; stop workers whose lease is gone; claim
        jobs whose replica vanished (their leases expire, nobody says so)."""
        interval = self._settings.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                ids = [w.job_id for w in self._workers.values() if not w.lost]
                held = await asyncio.to_thread(
                    self._store.renew, self.replica, ids, self._settings.lease_s
                )
                for job_id in set(ids) - held:
                    worker = self._workers.get(job_id)
                    if worker is not None and job_id not in self._finalizing:
                        self._lose(worker)
                self._refresh_queued()
                self._kick()
            except Exception:
                log.exception("renewing training leases failed; retrying")

    def _lose(self, worker: WorkerRun) -> None:
        """The job is no longer ours: stop its worker, write nothing more."""
        job = self._store.get(worker.job_id)
        if job is not None and job.state is JobState.CANCELLED:
            self._stop_cancelled(worker)
            return
        log.warning("training job %s: lease lost to another replica; stopping", worker.job_id)
        worker.lost = True
        worker.kill()

    def _stop_cancelled(self, worker: WorkerRun) -> None:
        if worker.cancel_sent:
            return
        worker.cancel_sent = True
        if worker.step_at_cancel is None:
            worker.step_at_cancel = worker.last_step
        if worker.listening:
            worker.command("cancel")
            self._spawn(worker.kill_later(self._settings.cancel_grace_s))
        else:
            worker.kill()  # still starting up: nothing to stop gracefully

    # Running jobs.

    def _launch(self, claim: Claimed) -> None:
        job = claim.job
        if claim.taken_over:
            log.warning(
                "training job %s: its replica vanished; resuming it from its last checkpoint",
                job.job_id,
            )
        worker = WorkerRun(job=job, devices=self._settings.devices, gpu_base=job.gpu_seconds)
        self._workers[job.job_id] = worker
        self._metrics.training_running.set(len(self._workers))
        worker.task = asyncio.create_task(self._run(worker), name=f"training-{job.job_id}")
        self._runs.add(worker.task)
        worker.task.add_done_callback(self._runs.discard)

    async def _run(self, worker: WorkerRun) -> None:
        code: int | None = None
        try:
            if worker.job.crashes > self._settings.max_crashes:
                worker.outcome = "crashed"
            else:
                code = await self._run_process(worker)
        except DreamsightError as error:
            worker.outcome, worker.reason = "failed", error.message
        except Exception:
            log.exception("training job %s: the worker could not run", worker.job_id)
        finally:
            if worker.proc is not None and worker.proc.returncode is None:
                worker.kill()  # never leave a worker training for nobody
                code = await worker.proc.wait()
            self._charge(worker)
            del self._workers[worker.job_id]
            self._metrics.training_running.set(len(self._workers))
        try:
            await self._after_exit(worker, code)
        except Exception:
            log.exception("training job %s: ending it failed", worker.job_id)
        self._kick()

    async def _run_process(self, worker: WorkerRun) -> int:
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
        await worker.start(job_dir, s.torch_threads)
        async for event in worker.events():
            try:
                self._on_event(worker, event)
            except Exception:  # the store unreachable a moment: the lease decides
                log.exception("training job %s: recording an event failed", job.job_id)
        assert worker.proc is not None
        return await worker.proc.wait()

    def _on_event(self, worker: WorkerRun, event: WorkerEvent) -> None:
        job_id = worker.job_id
        if isinstance(event, WorkerStarted):
            worker.listening = True
            return
        if isinstance(event, TrainingBegan):
            worker.resumed_from = event.step
            return
        if isinstance(event, Exported | Failed):
            worker.outcome = "exported" if isinstance(event, Exported) else "failed"
            worker.reason = event.reason if isinstance(event, Failed) else ""
            return
        if isinstance(event, Stopped):
            worker.outcome = event.why
            return
        if worker.lost or worker.cancel_sent:
            return  # a job that is no longer ours, or a cancelled one finishing its step
        payload: JobEventPayload
        fields: dict[str, Any] = {}
        if isinstance(event, ClassImagesDrawn):
            payload = ClassImagesProgress(event.done, event.total)
        elif isinstance(event, StepFinished):
            worker.last_step = event.step
            self._metrics.training_steps.inc()
            fields = {"step": event.step, "gpu_seconds": self._charge(worker)}
            payload = TrainingStep(
                step=event.step,
                total_steps=event.total,
                loss=_number(event.loss),
                learning_rate=_number(event.lr),
                eta_s=_number(event.eta_s),
            )
        elif isinstance(event, CheckpointWritten):
            payload = CheckpointSaved(event.step)
        elif isinstance(event, ValidationRendered):
            path = self._files.job_dir(job_id) / event.path
            if path.parent.parent != self._files.job_dir(job_id):
                return
            payload = ValidationImage(event.step, path.read_bytes())
        else:
            return
        if self._publish(job_id, JobState.RUNNING, payload, self.replica, **fields) is None:
            self._lose(worker)  # cancelled or taken over meanwhile

    def _charge(self, worker: WorkerRun) -> float:
        """The job's GPU-seconds so far: devices times its workers' wall time."""
        total = worker.gpu_seconds()
        self._metrics.training_gpu_seconds.inc(max(0.0, total - worker.gpu_base - worker.charged))
        worker.charged = total - worker.gpu_base
        return total

    async def _after_exit(self, worker: WorkerRun, code: int | None) -> None:
        job = self._job(worker.job_id)
        gpu = worker.gpu_base + worker.charged
        outcome = worker.outcome or "crashed"
        if job.state is JobState.CANCELLED:
            outcome = "cancelled"
        elif worker.lost:
            outcome = "lost"
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
            if job.state is JobState.CANCELLED and worker.cancel_sent:
                self._store.update(job.job_id, gpu_seconds=gpu)
            await asyncio.to_thread(self._clean_up, job.job_id)
            return
        if worker.lost or job.lease_owner != self.replica:
            return  # another replica has it now
        me = self.replica
        if self._stopping:
            # Back to the queue, first in line, for any replica to resume.
            self._publish(
                job.job_id, JobState.QUEUED, JobQueued(self._store.queue_position(job)), me,
                gpu_seconds=gpu, lease_owner=None, lease_expires=None,
            )  # fmt: skip
            return
        if outcome == "exported" and code == 0:
            self._store.update(job.job_id, gpu_seconds=gpu)
            await self._succeed(job)
            return
        if outcome == "failed":
            self._store.update(job.job_id, gpu_seconds=gpu)
            reason = worker.reason
            self._end(job, JobState.FAILED, JobFailed(reason), reason=reason, holder=me)
            return
        crashes = job.crashes + (0 if worker.proc is None else 1)
        if crashes > self._settings.max_crashes:
            reason = f"the training worker stopped unexpectedly {crashes} times"
            self._store.update(job.job_id, gpu_seconds=gpu, crashes=crashes)
            self._end(job, JobState.FAILED, JobFailed(reason), reason=reason, holder=me)
            return
        log.warning("training job %s: worker died; resuming from its last checkpoint", job.job_id)
        self._publish(
            job.job_id, JobState.QUEUED, JobQueued(self._store.queue_position(job)), me,
            gpu_seconds=gpu, crashes=crashes, lease_owner=None, lease_expires=None,
        )  # fmt: skip
        self._refresh_queued()

    async def _succeed(self, job: StoredJob) -> None:
        """Move the export into place, register it, then mark the job done."""
        self._finalizing.add(job.job_id)
        name = job.model_name
        final = self._files.model_dir(_model_dir_name(name, job.job_id))
        me = self.replica
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
            if not self._end(job, JobState.SUCCEEDED, JobSucceeded(name), model=name, holder=me):
                # Cancelled elsewhere while we registered it: the cancel stands.
                await asyncio.to_thread(self._registry.delete, name, job.tenant)
        except DreamsightError as error:
            reason = error.message
            self._end(job, JobState.FAILED, JobFailed(reason), reason=reason, holder=me)
        except Exception:
            log.exception("training job %s: registering the model failed", job.job_id)
            reason = "the trained model could not be saved"
            self._end(job, JobState.FAILED, JobFailed(reason), reason=reason, holder=me)
        finally:
            self._finalizing.discard(job.job_id)


def _shown(params: JobParams) -> dict[str, Any]:
    """The job parameters a TrainingSettingsView reports, by field name."""
    named = {f.name for f in fields(TrainingSettingsView)} - {"output_model_name"}
    shown = {name: getattr(params, name) for name in named}
    shown["kind"] = TuneKind(params.kind)
    return shown


def _model_dir_name(name: str, job_id: str) -> str:
    """The directory of the model a job exports: unique per job (it ends in the
    22-character job id), since two tenants may each own a model of one name."""
    return f"{name[:70]}-{job_id}"


def _number(value: float | None) -> float:
    if value is None:
        return 0.0
    return value if math.isfinite(value) else 0.0


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
