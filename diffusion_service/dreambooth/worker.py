"""``python -m diffusion_service.dreambooth.worker JOB_DIR``: run one job.

The service starts one worker process per running job (see
:mod:`diffusion_service.jobs.manager` for why a process and not a thread). The
worker reads ``JOB_DIR/job.json`` and talks to the service over its standard
streams:

- standard output carries events, one JSON object per line, of the typed
  schema in :mod:`diffusion_service.jobs.worker_events` (shared with the
  manager that reads them); everything else the process prints, Python's, Lightning's
  or diffusers', goes to standard error, which the service sends to
  ``JOB_DIR/worker.log``;
- standard input carries commands, one per line: ``cancel`` (stop after the
  running step, keep nothing) or ``shutdown`` (save a checkpoint of the
  running step, stop; the job resumes at the next start). End of input means
  the service is gone and counts as ``shutdown``, so a worker never trains on
  for a service that was killed.

The last event is ``Exported`` (the pipeline is in the export directory),
``Stopped`` (``why``: cancel or shutdown) or ``Failed`` (a ``reason`` safe
to show the job's owner; the traceback is in the log). A lock
on ``JOB_DIR/worker.lock`` keeps a second worker of the same job (a service
restarted while the old worker was still saving) waiting until the first
is gone; on shared storage the lock also keeps a replica that took over
a job from one that vanished off its files until the old worker is gone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import threading
from pathlib import Path
from typing import IO, Any

from diffusion_service.dreambooth.params import WorkerSpec
from diffusion_service.jobs.worker_events import (
    Failed,
    Stopped,
    WorkerEvent,
    WorkerStarted,
    encode,
)

log = logging.getLogger("diffusion_service.dreambooth.worker")

JOB_FILE = "job.json"
LOCK_FILE = "worker.lock"


class EventWriter:
    """JSON lines on a private copy of the original standard output."""

    def __init__(self, stream: IO[str] | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: WorkerEvent) -> None:
        """Report one event; a vanished reader is ignored (the listener stops us)."""
        if self._stream is None:
            return
        line = encode(event)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                self._stream = None


class StdinControl:
    """Commands from the service, read by a daemon thread."""

    def __init__(self) -> None:
        self._cancel = threading.Event()
        self._shutdown = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    def listen(self, stream: IO[str]) -> None:
        """Read commands until end of input (which means shutdown)."""
        for line in stream:
            command = line.strip()
            if command == "cancel":
                self._cancel.set()
            elif command == "shutdown":
                self._shutdown.set()
        self._shutdown.set()


class _Never:
    """The control of ranks other than 0: they follow rank 0's decision."""

    cancelled = False
    shutting_down = False


def safe_reason(error: BaseException) -> str:
    """What the job's owner may read about a failure (details go to the log)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return "out of memory; try a lower resolution or fewer class images"
    from dreamsight_server.errors import InvalidArgument

    if isinstance(error, InvalidArgument):
        return f"an input image could not be used ({error.message})"
    return "training failed; the operator can find the cause in the service log"


def main(argv: list[str] | None = None) -> int:
    """Run the job in ``argv[0]``; the exit status is 0 unless it failed."""
    args = sys.argv[1:] if argv is None else argv
    job_dir = Path(args[0])
    rank = int(os.environ.get("LOCAL_RANK", "0") or 0) + int(os.environ.get("NODE_RANK", "0") or 0)
    events_out: IO[str] | None = None
    if rank == 0:
        # Events keep the real stdout; stray prints go to stderr (the log).
        events_out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    events = EventWriter(events_out)
    control: StdinControl | _Never = _Never()
    if rank == 0:
        control = StdinControl()
        threading.Thread(target=control.listen, args=(sys.stdin,), daemon=True).start()
    if rank != 0:
        return _run(job_dir, None, control)
    with (job_dir / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel however we exit
        return _run(job_dir, events, control)


def _run(job_dir: Path, events: EventWriter | None, control: Any) -> int:
    from dreamsight_server import torch_compat

    torch_compat.install()
    spec = WorkerSpec.read(job_dir / JOB_FILE)
    import torch

    torch.set_num_threads(spec.runtime.torch_threads)
    if events is not None:
        events.emit(WorkerStarted(os.getpid()))
    from diffusion_service.dreambooth.class_images import StopRequested
    from diffusion_service.dreambooth.trainer import run_job

    try:
        outcome = run_job(spec, job_dir, events, control)
    except StopRequested:
        outcome = "cancelled" if control.cancelled else "stopped"
    except BaseException as error:
        log.exception("job %s failed", spec.runtime.job_id)
        if events is not None:
            events.emit(Failed(safe_reason(error)))
        return 1
    log.info("job %s: %s", spec.runtime.job_id, outcome)
    if events is not None and outcome != "exported":
        events.emit(Stopped("cancel" if outcome == "cancelled" else "shutdown"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
