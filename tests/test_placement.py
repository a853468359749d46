"""Placement on a CPU-only machine: the vision service and vLLM's engine core
off the cores vLLM's CPU workers are bound to, the engine core beside the
first worker while the engine is busy where that leaves one core
(vision_service/placement.py), and the gateway beside the vision service
(dreamsight up).

Real processes: a parent standing for the vision service, with children
standing for vLLM's engine core and a worker (their process titles say
``VLLM::EngineCore`` and ``VLLM::Worker``, as vLLM's do), the worker bound to
the first core as vLLM binds it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil  # type: ignore[import-untyped]
import pytest
from dreamsight._up import place_beside

from vision_service.placement import EngineCoreShift, keep_off_workers
from vision_service.placement import cores_of as worker_cores

CORES = sorted(os.sched_getaffinity(0))
SLEEPER = "import time; time.sleep(60)"
# A worker whose second thread binds itself to the last core, as an OpenMP
# runtime binds each of a worker's threads to a core of its own.
OMP_WORKER = (
    "import os, threading, time; "
    f"threading.Thread(target=lambda: (os.sched_setaffinity(0, {{{CORES[-1]}}}), "
    "time.sleep(60))).start(); time.sleep(60)"
)
# A parent with two children: an engine core and a worker (bound as vLLM binds
# it: argv 1 its cores, argv 2 its program).
TREE = f"""
import os, subprocess, sys, time
titled = 'exec -a "$0" "$1" -c "$2"'
core = subprocess.Popen(["bash", "-c", titled, "VLLM::EngineCore", sys.executable, {SLEEPER!r}])
worker = subprocess.Popen(["bash", "-c", titled, "VLLM::Worker", sys.executable, sys.argv[2]])
time.sleep(0.5)  # until bash has become the worker
os.sched_setaffinity(worker.pid, set(map(int, sys.argv[1].split(","))))
print(core.pid, worker.pid, flush=True)
time.sleep(60)
"""


def policies_of(pid: int) -> set[int]:
    """The scheduling policies of a process's threads."""
    return {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def cores_of(pid: int) -> set[int]:
    """The cores of every thread of a process (one set when they agree)."""
    sets = {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}
    assert len(sets) == 1, f"threads of {pid} disagree: {sets}"
    return set(next(iter(sets)))


@pytest.fixture
def tree(request: pytest.FixtureRequest) -> Iterator[tuple[int, int, int]]:
    """(parent, engine core, worker) pids; the worker's cores and program given by the test."""
    cores, program = request.param
    parent = subprocess.Popen(
        [sys.executable, "-c", TREE, ",".join(map(str, cores)), program],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        core, worker = map(int, parent.stdout.readline().split())
        deadline = time.monotonic() + 10
        spread = set(CORES) if program == OMP_WORKER else set(cores)  # its threads, bound
        while (
            "Worker" not in " ".join(psutil.Process(worker).cmdline()[:1])
            or "EngineCore" not in " ".join(psutil.Process(core).cmdline()[:1])
            or worker_cores(worker) != spread
        ):
            assert time.monotonic() < deadline, "the children never took their titles and cores"
            time.sleep(0.05)
        yield parent.pid, core, worker
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()


def test_the_machine_has_cores_to_share() -> None:
    assert len(CORES) >= 2, "these tests need two cores (CI and the dev box have them)"


@pytest.mark.parametrize("tree", [(CORES[:1], SLEEPER)], indirect=True)
def test_front_end_and_engine_core_move_off_the_workers_cores(
    tree: tuple[int, int, int],
) -> None:
    parent, core, worker = tree
    free = set(CORES[1:])
    assert keep_off_workers(parent) == free
    assert cores_of(parent) == free
    assert cores_of(core) == free
    assert cores_of(worker) == set(CORES[:1])  # the worker keeps its own
    # The front end yields on waking; vLLM's engine core and worker as they were.
    assert policies_of(parent) == {os.SCHED_BATCH}
    assert policies_of(core) == policies_of(worker) == {os.SCHED_OTHER}


@pytest.mark.parametrize("tree", [(CORES[:1], SLEEPER)], indirect=True)
def test_a_refused_policy_leaves_the_placement_standing(
    tree: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sandbox that refuses SCHED_BATCH (seccomp) still gets the cores."""
    parent, core, _ = tree

    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    free = set(CORES[1:])
    assert keep_off_workers(parent) == free
    assert cores_of(parent) == cores_of(core) == free
    assert policies_of(parent) == {os.SCHED_OTHER}


@pytest.mark.parametrize("tree", [(CORES[:1], SLEEPER)], indirect=True)
def test_the_engine_core_goes_beside_the_worker_while_the_engine_is_busy(
    tree: tuple[int, int, int],
) -> None:
    parent, core, worker = tree
    free = keep_off_workers(parent)
    shift = EngineCoreShift.find(parent, {CORES[-1]})  # one core left (as on two cores)
    assert shift is not None and free is not None
    shift.update(1)
    assert cores_of(core) == free
    shift.update(shift.busy)
    assert cores_of(core) == set(CORES[:1])  # the worker's: they take turns
    shift.update(shift.idle + 1)
    assert cores_of(core) == set(CORES[:1])  # not back before the load has fallen
    shift.update(shift.idle)
    assert cores_of(core) == free
    assert cores_of(worker) == set(CORES[:1])
    assert cores_of(parent) == free  # the front end never moves


@pytest.mark.parametrize("tree", [(CORES[:1], SLEEPER)], indirect=True)
def test_the_engine_core_stays_put_with_cores_to_spare(tree: tuple[int, int, int]) -> None:
    parent, _, _ = tree
    assert EngineCoreShift.find(parent, set(CORES)) is None  # two cores left, or more
    assert EngineCoreShift.find(parent, None) is None  # nothing was placed
    lone = subprocess.Popen([sys.executable, "-c", SLEEPER])
    try:
        assert EngineCoreShift.find(lone.pid, {CORES[-1]}) is None  # no engine core
    finally:
        lone.kill()
        lone.wait()


@pytest.mark.parametrize(
    "tree", [(CORES, SLEEPER), (CORES[:1], OMP_WORKER)], ids=["bound", "threads"], indirect=True
)
def test_nothing_moves_when_the_workers_cover_every_core(tree: tuple[int, int, int]) -> None:
    """Bound to every core, or its threads on every core between them."""
    parent, core, _ = tree
    assert keep_off_workers(parent) is None
    assert cores_of(parent) == set(CORES)
    assert cores_of(core) == set(CORES)
    assert policies_of(parent) == {os.SCHED_OTHER}


def test_nothing_moves_without_workers() -> None:
    lone = subprocess.Popen([sys.executable, "-c", SLEEPER])
    try:
        assert keep_off_workers(lone.pid) is None
        assert cores_of(lone.pid) == set(CORES)
    finally:
        lone.kill()
        lone.wait()


def test_the_gateway_goes_beside_a_placed_vision_service() -> None:
    vision = subprocess.Popen([sys.executable, "-c", SLEEPER])
    gateway = subprocess.Popen([sys.executable, "-c", SLEEPER])
    batch, other = os.SCHED_BATCH, os.SCHED_OTHER
    try:
        os.sched_setscheduler(vision.pid, batch, os.sched_param(0))
        place_beside(gateway.pid, vision.pid)  # the vision service not placed: nothing moves
        assert cores_of(gateway.pid) == set(CORES)
        assert policies_of(gateway.pid) == {other}
        os.sched_setaffinity(vision.pid, CORES[1:])
        os.sched_setscheduler(vision.pid, other, os.sched_param(0))
        place_beside(gateway.pid, vision.pid)  # placed, under no other policy
        assert cores_of(gateway.pid) == set(CORES[1:])
        assert policies_of(gateway.pid) == {other}
        os.sched_setscheduler(vision.pid, batch, os.sched_param(0))
        place_beside(gateway.pid, vision.pid)
        assert policies_of(gateway.pid) == {batch}  # as the vision service runs
    finally:
        for process in (vision, gateway):
            process.kill()
            process.wait()
