"""The job store's contract, on SQLite and on a real PostgreSQL (issue 18).

Every test runs against both implementations: creation with the tenant's
limit counted atomically, events numbered in order, no event after the end,
progress written only by the lease holder, claims oldest first, leases that
renew and lapse, racing claimers that never get one job twice, and changes
heard by another replica's store.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from diffusion_service.domain import (
    CheckpointSaved,
    JobCancelled,
    JobQueued,
    JobState,
    TrainingStep,
    ValidationImage,
)
from diffusion_service.jobs.store import (
    Change,
    DuplicateRequest,
    JobStore,
    NameTaken,
    SavedModel,
    TooManyJobs,
    open_store,
)
from tests.external_servers import postgres_server
from tests.job_store_helpers import STORE_KINDS, params, store_location


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture(params=STORE_KINDS)
def location(request: pytest.FixtureRequest, tmp_path: Path, postgres_dsn: str) -> Path | str:
    return store_location(request.param, tmp_path, postgres_dsn)


@pytest.fixture
def store(location: Path | str) -> Iterator[JobStore]:
    opened = open_store(location)
    yield opened
    opened.close()


def add(store: JobStore, job_id: str, tenant: str = "alice", **kwargs: object) -> None:
    store.insert_job(
        job_id,
        tenant,
        str(kwargs.get("request_id", "")),
        params(),
        f"model-{job_id}",
        JobQueued(0),
        kwargs.get("max_active"),  # type: ignore[arg-type]
    )


def job_ids(n: int, prefix: str = "j") -> list[str]:
    return [f"{prefix}{i:03d}".ljust(22, "x") for i in range(n)]


def test_jobs_and_events_round_trip_in_order(store: JobStore) -> None:
    (a,) = job_ids(1)
    add(store, a, request_id="req-1")
    with pytest.raises(DuplicateRequest):
        add(store, job_ids(1, "k")[0], request_id="req-1")
    found = store.find_by_request("alice", "req-1")
    assert found is not None and found.job_id == a
    assert store.find_by_request("bob", "req-1") is None, "request ids are per tenant"
    step = TrainingStep(step=1, total_steps=4, loss=0.5, learning_rate=1e-4, eta_s=3.0)
    assert store.record(a, JobState.RUNNING, step, step=1, gpu_seconds=2.5) is not None
    store.record(a, JobState.RUNNING, ValidationImage(1, b"\x89PNG-bytes"))
    store.record(a, JobState.RUNNING, CheckpointSaved(1))
    end = store.record(a, JobState.CANCELLED, JobCancelled(), end_time=time.time())
    assert end is not None and end.seq == 5
    assert store.record(a, JobState.RUNNING, CheckpointSaved(2)) is None, "it has ended"
    events = store.events(a)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert [type(e.payload) for e in events] == [
        JobQueued, TrainingStep, ValidationImage, CheckpointSaved, JobCancelled,
    ]  # fmt: skip
    assert events[1].payload == step and events[2].payload == ValidationImage(1, b"\x89PNG-bytes")
    assert [e.seq for e in store.events(a, 3)] == [4, 5]
    job = store.get(a)
    assert job is not None
    assert (job.state, job.step, job.gpu_seconds) == (JobState.CANCELLED, 1, 2.5)


def test_an_active_job_reserves_its_model_name_in_its_tenants_namespace(store: JobStore) -> None:
    first, second, third = job_ids(3)
    store.insert_job(first, "alice", "", params(), "my-dog", JobQueued(0), None)
    with pytest.raises(NameTaken):
        store.insert_job(second, "alice", "", params(), "my-dog", JobQueued(0), None)
    store.insert_job(second, "bob", "", params(), "my-dog", JobQueued(0), None)  # bob's own
    store.record(first, JobState.CANCELLED, JobCancelled())
    store.insert_job(third, "alice", "", params(), "my-dog", JobQueued(0), None)  # free again


def test_the_tenants_limit_counts_active_jobs_atomically(location: Path | str) -> None:
    """Eight stores (eight replicas) create at once; a limit of 2 admits exactly 2."""
    stores = [open_store(location) for _ in range(8)]
    admitted, refused = [], []
    barrier = threading.Barrier(len(stores))

    def create(store: JobStore, job_id: str) -> None:
        barrier.wait()
        try:
            add(store, job_id, max_active=2)
            admitted.append(job_id)
        except TooManyJobs as error:
            refused.append(error.active)

    threads = [
        threading.Thread(target=create, args=(s, j))
        for s, j in zip(stores, job_ids(8), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(admitted) == 2 and refused == [2] * 6
        add(stores[0], job_ids(1, "b")[0], tenant="bob", max_active=1)  # another tenant's own
    finally:
        for s in stores:
            s.close()


def test_claims_go_oldest_first_and_leases_renew_and_lapse(store: JobStore) -> None:
    first, second, third = job_ids(3)
    for job_id in (first, second, third):
        add(store, job_id)
    claimed = store.claim("replica-a", 0.6, 2)
    assert [c.job.job_id for c in claimed] == [first, second]
    assert all(not c.taken_over and c.job.lease_owner == "replica-a" for c in claimed)
    assert [c.job.job_id for c in store.claim("replica-b", 0.6, 5)] == [third]
    assert store.claim("replica-c", 0.6, 5) == []
    # Only the holder writes progress.
    step = CheckpointSaved(1)
    assert store.record(first, JobState.RUNNING, step, holder="replica-b") is None
    assert store.record(first, JobState.RUNNING, step, holder="replica-a") is not None
    time.sleep(0.3)
    assert store.renew("replica-a", [first, third], 0.6) == {first}, "third is b's"
    time.sleep(0.45)  # second's lease (not renewed) has lapsed, first's has not
    taken = store.claim("replica-c", 0.6, 5)
    assert {c.job.job_id for c in taken} == {second, third}
    assert all(c.taken_over and c.job.crashes == 1 and c.job.attempts == 2 for c in taken)
    assert store.renew("replica-a", [first, second], 0.6) == {first}, "second is c's now"
    assert store.record(second, JobState.RUNNING, step, holder="replica-a") is None


def test_racing_claimers_never_get_one_job_twice(location: Path | str) -> None:
    """Six replicas claim one job at a time as fast as they can, from 30
    queued jobs, then race again for the same jobs once their leases lapse."""
    seed = open_store(location)
    for job_id in job_ids(30):
        add(seed, job_id)
    stores = [open_store(location) for _ in range(6)]
    claims: list[tuple[str, str, bool]] = []
    lock = threading.Lock()

    def claim_all(store: JobStore, owner: str, lease_s: float) -> None:
        while got := store.claim(owner, lease_s, 1):
            with lock:
                claims.extend((c.job.job_id, owner, c.taken_over) for c in got)

    def race(lease_s: float) -> None:
        threads = [
            threading.Thread(target=claim_all, args=(s, f"r{i}", lease_s))
            for i, s in enumerate(stores)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        race(0.5)
        assert Counter(j for j, _, _ in claims) == Counter(job_ids(30)), "each claimed once"
        time.sleep(0.6)
        claims.clear()
        race(60)
        assert Counter(j for j, _, _ in claims) == Counter(job_ids(30)), "each taken over once"
        assert all(taken for _, _, taken in claims)
        assert {j.lease_owner for j in seed.in_state(JobState.RUNNING)} <= {
            f"r{i}" for i in range(6)
        }
    finally:
        seed.close()
        for s in stores:
            s.close()


def test_fine_tuned_models_are_per_tenant(store: JobStore) -> None:
    store.save_model(SavedModel("my-dog", "alice", "sd-demo", "job-a", "/m/a"))
    store.save_model(SavedModel("my-dog", "bob", "sd-demo", "job-b", "/m/b"))
    store.save_model(SavedModel("my-dog", "bob", "sd-demo", "job-c", "/m/c"))  # replaces
    assert store.find_model("my-dog", "bob") == SavedModel(
        "my-dog", "bob", "sd-demo", "job-c", "/m/c"
    )
    assert store.find_model("my-dog", "mallory") is None
    store.delete_model("my-dog", "alice")
    assert [m.job_id for m in store.models()] == ["job-c"]


def test_another_replicas_changes_are_heard(location: Path | str) -> None:
    """A change made through one store reaches the subscribers of another
    (PostgreSQL NOTIFY between replicas; within the process for SQLite,
    whose store has a single replica)."""
    writer = open_store(location)
    listener = writer if isinstance(location, Path) else open_store(location)
    heard: list[Change] = []
    got = threading.Event()

    def on_change(change: Change) -> None:
        heard.append(change)
        if change.state is JobState.CANCELLED:
            got.set()

    listener.subscribe(on_change)
    time.sleep(0.3)  # the listener's LISTEN is in place
    try:
        (a,) = job_ids(1)
        add(writer, a)
        writer.claim("r1", 30, 1)
        writer.record(a, JobState.CANCELLED, JobCancelled())
        assert got.wait(10), f"heard only {heard}"
        assert heard == [
            Change(a, JobState.QUEUED),
            Change(a, JobState.RUNNING),
            Change(a, JobState.CANCELLED),
        ]
    finally:
        if listener is not writer:
            listener.close()
        writer.close()


def test_a_sqlite_store_opening_under_another_writer_waits_for_it(tmp_path: Path) -> None:
    """A store that opens a new file while another connection holds its write
    lock waits for the lock instead of failing (SQLite answers the switch to
    WAL with BUSY at once, without its busy handler; eight replicas opening a
    fresh file together hit that in CI)."""
    path = tmp_path / "jobs.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    released = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    released.start()
    store = open_store(path)
    try:
        (a,) = job_ids(1)
        add(store, a)
        found = store.get(a)
        assert found is not None and found.state is JobState.QUEUED
    finally:
        released.join()
        other.close()
        store.close()
