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

Where that leaves a single core (vLLM's one reserved core on a machine of one
worker), the engine core goes beside the first worker's main thread instead
of on it: the two take turns (the engine core schedules a step while its
worker waits for it, then waits, yielding its core, while the worker runs
the step; each spins with ``sched_yield`` meanwhile), so sharing a core costs
them little, and the one free core is left to the front ends, which work
while the worker runs. Measured on two cores (docs/benchmarks.md, eleventh
round): about 2% more tokens/s at 8 concurrent requests and 8-10% at 16, in
every round at 16, and less CPU per token in both vLLM processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable

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


def pin(pid: int, cores: Iterable[int]) -> None:
    """Run every thread of process pid on these cores only."""
    cores = set(cores)
    for tid in _threads(pid):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(tid, cores)


def keep_off_workers(
    root: int | None = None, *, engine_core_beside_worker: bool | None = None
) -> set[int] | None:
    """Move process root (this one by default) and its descendants other than
    vLLM's workers off the workers' cores, vLLM's engine core beside the first
    worker's main thread instead where that leaves one core (or as
    ``engine_core_beside_worker`` says); the cores the front end runs on now,
    or None when nothing moved (see the module doc)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        top = psutil.Process(root)
        tree = [top, *top.children(recursive=True)]
        workers = sorted((p for p in tree if _titled(p, WORKER_TITLE)), key=lambda p: p.pid)
        allowed = set(os.sched_getaffinity(top.pid))
        taken = set().union(*(cores_of(p.pid) for p in workers))
        free = allowed - taken
        if not workers or not free or taken >= allowed:
            return None
        beside = len(free) == 1 if engine_core_beside_worker is None else engine_core_beside_worker
        first = os.sched_getaffinity(workers[0].pid)  # its main thread's cores
        engine_cores = first if beside else free
        for process in tree:
            if process in workers:
                continue
            cores = engine_cores if _titled(process, ENGINE_CORE_TITLE) else free
            with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError):
                pin(process.pid, cores)
    except (psutil.Error, OSError) as error:  # placement is an optimization: never fatal
        log.warning("could not move the front end off vLLM's CPU workers: %s", error)
        return None
    log.info(
        "front end on cores %s and engine core on %s, vLLM's CPU workers on %s",
        sorted(free),
        sorted(engine_cores),
        sorted(taken),
    )
    return free
