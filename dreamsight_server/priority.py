"""A service's own CPU priority, below the engine processes it shares a machine with.

On a machine where the gateway and the vision service's front end share
cores with vLLM's engine core and worker, a token waits on the engine's step
loop (schedule, run the model, hand the outputs on) far more than on the
front ends, which work between steps. Lowering the front ends' priority (a
higher Linux nice value) gives the step loop the CPU first whenever both are
ready, and the front ends run in the time the engine leaves (it polls for its
worker's results between steps). ``make bench-openai`` measures the effect.

Linux nice values belong to threads, and a thread or process starts with its
creator's: :func:`lower_priority` renices every thread of this process as it
stands, so the engine processes a service started before (vLLM's engine core
and workers) keep their own priority, and the threads it starts later inherit
the lower one.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LOWEST = 19
"""The highest nice value, the lowest priority."""


def _threads() -> list[int]:
    try:
        return sorted(int(tid) for tid in os.listdir("/proc/self/task"))
    except FileNotFoundError:  # no /proc: the calling thread (the process, elsewhere)
        return [0]


def lower_priority(by: int) -> int:
    """Raise the nice value of each thread of this process by ``by`` (up to
    :data:`LOWEST`); returns how many threads it changed."""
    if by <= 0:
        return 0
    changed = 0
    for tid in _threads():
        try:
            current = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(LOWEST, current + by))
        except (ProcessLookupError, PermissionError):  # ended meanwhile; not ours
            continue
        changed += 1
    log.info("CPU priority of %d threads lowered by %d (nice), below the engine's", changed, by)
    return changed
