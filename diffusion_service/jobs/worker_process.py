"""One training worker process, as the manager sees it: start, talk, stop.

A running job is a worker process (``python -m
diffusion_service.dreambooth.worker JOB_DIR``) in its own process group, so a
kill takes its DDP ranks with it. Commands go to its standard input (see
:mod:`diffusion_service.dreambooth.worker`); its events come back on its
standard output in the schema of :mod:`diffusion_service.jobs.worker_events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from diffusion_service.jobs.store import StoredJob
from diffusion_service.jobs.worker_events import WorkerEvent, decode

log = logging.getLogger(__name__)

WORKER_MODULE = "diffusion_service.dreambooth.worker"


@dataclass
class WorkerRun:
    """One run of a job in a worker process, and what the manager knows of it."""

    job: StoredJob
    devices: int
    gpu_base: float
    """The job's GPU-seconds before this run (earlier runs, on any replica)."""
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
    cancel_sent: bool = False
    lost: bool = False
    """The lease is gone (cancelled or taken over elsewhere): write nothing more."""

    @property
    def job_id(self) -> str:
        return self.job.job_id

    def gpu_seconds(self) -> float:
        """The job's GPU-seconds so far: devices times this run's wall time, plus before."""
        return self.gpu_base + self.devices * (time.monotonic() - self.started)

    async def start(self, job_dir: Path, torch_threads: int) -> None:
        """Start the worker process (its standard error goes to worker.log)."""
        env = {**os.environ, "OMP_NUM_THREADS": str(torch_threads)}
        with (job_dir / "worker.log").open("ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
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
        self.started = time.monotonic()
        log.info("training job %s: worker %d started", self.job_id, self.proc.pid)
        if self.kill_requested:
            self.kill()
        for command in self.pending:
            self.command(command)

    async def events(self) -> AsyncIterator[WorkerEvent]:
        """The worker's events until it closes its output (bad lines are logged)."""
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                yield decode(line)
            except ValueError as error:
                log.warning("training job %s: bad line %r: %s", self.job_id, line[:200], error)

    def command(self, command: str) -> None:
        """Send ``cancel`` or ``shutdown`` (queued until the process exists)."""
        proc = self.proc
        if proc is None:
            self.pending.append(command)
            return
        if proc.stdin is None or proc.returncode is not None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            proc.stdin.write(f"{command}\n".encode())

    def kill(self) -> None:
        """SIGKILL the worker's process group (as soon as it exists)."""
        proc = self.proc
        if proc is None:
            self.kill_requested = True
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    async def kill_later(self, delay_s: float) -> None:
        """Kill the worker if it is still running after ``delay_s``."""
        if self.task is None:
            return
        _, late = await asyncio.wait({self.task}, timeout=delay_s)
        if late:
            log.warning("training job %s: worker ignored its stop; killing it", self.job_id)
            self.kill()
