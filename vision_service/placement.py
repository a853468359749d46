"""Which cores the vision service's own processes run on, on a CPU-only machine.

vLLM's CPU workers bind their threads to cores of their own (with
``VLLM_CPU_OMP_THREADS_BIND=auto``, its default, one core per worker is kept
back "for the serving framework"), while the front end that streams the
replies and vLLM's engine core that schedules the steps are left wherever the
kernel puts them, which is on a worker's core whenever theirs is busy: the
worker's model step then waits. Measured with ``make bench-openai`` on two
cores (docs/benchmarks.md, tenth round), moving them onto the cores no worker
is bound to cut the engine core's CPU per token by 20-30% and raised tokens/s
by about 6% at 8 and 16 concurrent requests.

So once the engine is up, :func:`keep_off_workers` moves this process (every
thread: those started later inherit it) and every process under it that is
not a worker onto the cores no worker is bound to. Nothing moves where the
workers are bound to no core of their own (GPUs, ``nobind``), where they
cover every core, or where the platform cannot say (no ``sched_setaffinity``).

The front ends placed there pass each message on by waking another thread on
the same cores: the vision service's write of a lane reply wakes the gateway,
whose writes wake their clients, and each gRPC write wakes gRPC's poller
thread. The kernel lets a woken thread take the core at once from the one
that woke it, which then waits for a core with its work half done: with 8
chats at once, almost a third of the vision service's samples (py-spy) sat
inside its lane writes' ``sendmsg`` and ``eventfd`` writes. So the moved
front end (this process, not vLLM's engine core or workers) runs under
``SCHED_BATCH``, whose woken threads wait for the running one to block or
spend its time slice, and the gateway placed beside it takes the same policy
(``dreamsight up``): each finishes what it has before the other runs.
Measured with ``make bench-openai`` (docs/benchmarks.md, fourteenth round).

Where that leaves a single core (vLLM's one reserved core on a machine of one
worker), the front ends and the engine core crowd onto it under load, and the
worker waits for the engine core. :class:`EngineCoreShift` then moves the
engine core beside the first worker's main thread while the engine is busy:
the two take turns (the engine core schedules a step while its worker waits,
and waits, yielding its core, while the worker runs it), and the free core is
left to the front ends. Measured on two cores (docs/benchmarks.md, eleventh
round), beside the worker for good it gave 8-11% more tokens/s at 16
concurrent requests and 2% at 8, but cost 23% at one, where every hand-over
between the two on one core waits for the scheduler: so it moves there only
while at least ``busy`` requests run, and back once no more than ``idle`` do.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

WORKER_TITLE = "Worker"
"""What vLLM's worker processes have in their process title (``VLLM::Worker``)."""
ENGINE_CORE_TITLE = "EngineCore"
"""What vLLM's engine core process has in its title (``VLLM::EngineCore``)."""


def _titled(process: psutil.Process, title: str) -> bool:
    with contextlib.suppress(psutil.Error):
        return title in process.name() or title in " ".join(process.cmdline()[:1])
    return False


def _is_worker(process: psutil.Process) -> bool:
    return _titled(process, WORKER_TITLE)


def _threads(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


def cores_of(pid: int) -> set[int]:
    """The cores any thread of process pid may run on (OpenMP runtimes bind each
    of a worker's threads to a core of its own, its main thread to the first)."""
    cores: set[int] = set()
    for tid in _threads(pid):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            cores |= os.sched_getaffinity(tid)
    return cores


def _each_thread(pid: int, act: Callable[[int], object]) -> None:
    """act(tid) for every thread of process pid (one that just ended is skipped)."""
    for tid in _threads(pid):
        with contextlib.suppress(ProcessLookupError):
            act(tid)


def pin(pid: int, cores: Iterable[int]) -> None:
    """Run every thread of process pid on these cores only."""
    cores = set(cores)
    _each_thread(pid, lambda tid: os.sched_setaffinity(tid, cores))


def run_as_batch(pid: int) -> None:
    """Every thread of process pid under ``SCHED_BATCH`` (those started later
    inherit it): woken, they wait for the thread running to block or spend its
    time slice (see the module doc). Nothing changes where Linux's policies are
    not available."""
    if not hasattr(os, "SCHED_BATCH"):
        return
    batch = os.sched_param(0)
    try:
        _each_thread(pid, lambda tid: os.sched_setscheduler(tid, os.SCHED_BATCH, batch))
    except OSError as error:  # a sandbox that refuses it: the placement stands
        log.warning("could not run the front end under SCHED_BATCH: %s", error)


def keep_off_workers(root: int | None = None) -> set[int] | None:
    """Move process root (this one by default) and its descendants other than
    vLLM's workers off the workers' cores, and run root under SCHED_BATCH; the
    cores they run on now, or None when nothing moved (see the module doc)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        top = psutil.Process(root)
        tree = [top, *top.children(recursive=True)]
        workers = [p for p in tree if _is_worker(p)]
        allowed = set(os.sched_getaffinity(top.pid))
        taken = set().union(*(cores_of(p.pid) for p in workers))
        free = allowed - taken
        if not workers or not free or taken >= allowed:
            return None
        for process in tree:
            if process not in workers:
                with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError):
                    pin(process.pid, free)
        run_as_batch(top.pid)
    except (psutil.Error, OSError) as error:  # placement is an optimization: never fatal
        log.warning("could not move the front end off vLLM's CPU workers: %s", error)
        return None
    log.info(
        "front end (SCHED_BATCH) and engine core on cores %s, off vLLM's CPU workers on %s",
        sorted(free),
        sorted(taken),
    )
    return free


@dataclass
class EngineCoreShift:
    """vLLM's engine core beside its first worker's main thread while the engine
    is busy, with the front end otherwise (see the module doc)."""

    engine_core: int
    beside: set[int]
    """The cores of the first worker's main thread."""
    free: set[int]
    """The front end's cores."""
    busy: int = 6
    """Requests running at which the engine core moves beside the worker."""
    idle: int = 2
    """Requests running at which it comes back."""
    moved: bool = False
    """Whether the engine core is beside the worker now."""

    def update(self, running: int) -> None:
        """Follow the engine's load: the requests running in it now."""
        move = running >= self.busy if not self.moved else running > self.idle
        if move == self.moved:
            return
        try:
            pin(self.engine_core, self.beside if move else self.free)
        except OSError as error:  # the engine core is gone: the engine reports that itself
            log.debug("could not move vLLM's engine core: %s", error)
            return
        self.moved = move

    @classmethod
    def find(cls, root: int | None = None, free: set[int] | None = None) -> EngineCoreShift | None:
        """For process root's engine core, once keep_off_workers left the front end
        the one core free; None where that is not so, or no engine core is found."""
        if not free or len(free) != 1:
            return None
        try:
            tree = psutil.Process(root).children(recursive=True)
            workers = sorted((p for p in tree if _is_worker(p)), key=lambda p: p.pid)
            cores = [p for p in tree if _titled(p, ENGINE_CORE_TITLE)]
            if not workers or len(cores) != 1:
                return None
            beside = set(os.sched_getaffinity(workers[0].pid))  # its main thread's cores
        except (psutil.Error, OSError):
            return None
        return cls(cores[0].pid, beside, set(free))
