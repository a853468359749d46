"""Placement on a CPU-only machine: the vision service and vLLM's engine core
off the cores vLLM's CPU workers are bound to (vision_service/placement.py),
and the gateway beside the vision service (dreamsight up).

Real processes: a parent standing for the vision service, with children
standing for vLLM's engine core and a worker (its process title says
``VLLM::Worker``, as vLLM's does), bound to the first core as vLLM binds it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil  # type: ignore[import-untyped]
import pytest
from dreamsight._up import place_beside

from vision_service.placement import cores_of as worker_cores
from vision_service.placement import keep_off_workers

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
core = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}])
title = 'exec -a VLLM::Worker "$0" -c "$1"'
worker = subprocess.Popen(["bash", "-c", title, sys.executable, sys.argv[2]])
time.sleep(0.5)  # until bash has become the worker
os.sched_setaffinity(worker.pid, set(map(int, sys.argv[1].split(","))))
print(core.pid, worker.pid, flush=True)
time.sleep(60)
"""


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
        while "Worker" not in " ".join(psutil.Process(worker).cmdline()[:1]) or (
            worker_cores(worker) != spread
        ):
            assert time.monotonic() < deadline, "the worker never took its title and cores"
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


@pytest.mark.parametrize(
    "tree", [(CORES, SLEEPER), (CORES[:1], OMP_WORKER)], ids=["bound", "threads"], indirect=True
)
def test_nothing_moves_when_the_workers_cover_every_core(tree: tuple[int, int, int]) -> None:
    """Bound to every core, or its threads on every core between them."""
    parent, core, _ = tree
    assert keep_off_workers(parent) is None
    assert cores_of(parent) == set(CORES)
    assert cores_of(core) == set(CORES)


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
    try:
        place_beside(gateway.pid, vision.pid)  # the vision service not placed: nothing moves
        assert cores_of(gateway.pid) == set(CORES)
        os.sched_setaffinity(vision.pid, CORES[1:])
        place_beside(gateway.pid, vision.pid)
        assert cores_of(gateway.pid) == set(CORES[1:])
    finally:
        for process in (vision, gateway):
            process.kill()
            process.wait()
