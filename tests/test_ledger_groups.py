"""The ledger's group writes (gateway.store.AsyncStore.record_usage): bills
that wait while a write is under way go together in one transaction, each is
still billed once, one bad bill costs no other bill its row, and a bill waiting
for its write already counts in the tenant's windows."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from gateway.budgets import Budgets
from gateway.keys import Caller
from gateway.store import AsyncStore, Bill, SqlStore
from gateway.tiers import Tier, Window


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AsyncStore]:
    store = AsyncStore(SqlStore(str(tmp_path / "ledger.sqlite3")))
    yield store
    store.close()


def bill(ledger_id: str, gpu_seconds: float = 1.0, tenant: Any = "t") -> Bill:
    return Bill(ledger_id, tenant, "pro", "VisionService", gpu_seconds, 1.0, f"r-{ledger_id}")


def spy_batches(store: AsyncStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch the store's thread is given to write."""
    sizes: list[int] = []
    write = store.sync.record_usages

    def counted(bills: Sequence[Bill]) -> list[bool]:
        sizes.append(len(bills))
        return write(bills)

    monkeypatch.setattr(store.sync, "record_usages", counted)
    return sizes


async def test_bills_that_wait_together_are_written_in_one_transaction(
    store: AsyncStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = spy_batches(store, monkeypatch)
    assert await store.record_usage(bill("first", 0.5))
    billed = await asyncio.gather(
        *(store.record_usage(bill(f"call-{i}")) for i in range(20)),
        store.record_usage(bill("first", 0.5)),  # the same computation again
    )
    assert billed == [True] * 20 + [False]
    assert sizes == [1, 21]
    assert store.sync.total_usage() == (21, 20.5)


async def test_one_bad_bill_costs_no_other_bill_its_row(store: AsyncStore) -> None:
    unbindable = cast(Any, object())  # sqlite3 cannot bind it: the batch's transaction fails
    outcomes = await asyncio.gather(
        *(store.record_usage(bill(f"good-{i}")) for i in range(5)),
        store.record_usage(bill("bad", tenant=unbindable)),
        return_exceptions=True,
    )
    assert outcomes[:5] == [True] * 5
    assert isinstance(outcomes[5], sqlite3.ProgrammingError)
    assert store.sync.total_usage() == (5, 5.0)


async def test_a_failing_store_fails_each_waiting_bill_and_the_next_write_works(
    store: AsyncStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = store.sync.record_usages
    failing = True
    tries: list[int] = []

    def flaky(bills: Sequence[Bill]) -> list[bool]:
        tries.append(len(bills))
        if failing:
            raise sqlite3.OperationalError("disk I/O error")
        return write(bills)

    monkeypatch.setattr(store.sync, "record_usages", flaky)
    outcomes = await asyncio.gather(
        *(store.record_usage(bill(f"lost-{i}")) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, sqlite3.OperationalError) for o in outcomes)
    assert tries == [3]  # the database failed: no bill was tried again on its own
    failing = False
    assert await store.record_usage(bill("after"))
    assert await store.record_usage(bill("lost-0"))  # never written: billable now
    assert store.sync.total_usage() == (2, 2.0)


async def test_a_caller_that_stops_waiting_is_still_billed(store: AsyncStore) -> None:
    waiting = asyncio.ensure_future(store.record_usage(bill("gone")))
    await asyncio.sleep(0)
    waiting.cancel()
    assert await store.record_usage(bill("next"))
    assert store.sync.total_usage() == (2, 2.0)


async def test_a_write_takes_at_most_bills_per_write(
    store: AsyncStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = spy_batches(store, monkeypatch)
    monkeypatch.setattr(store, "BILLS_PER_WRITE", 4)
    assert all(await asyncio.gather(*(store.record_usage(bill(f"c{i}")) for i in range(10))))
    assert sizes == [4, 4, 2]


async def test_closing_writes_the_bills_still_waiting(tmp_path: Path) -> None:
    path = str(tmp_path / "closing.sqlite3")
    store = AsyncStore(SqlStore(path))
    waiting = [asyncio.ensure_future(store.record_usage(bill(f"late-{i}"))) for i in range(3)]
    await asyncio.sleep(0)  # queued, the writer started, nothing written yet
    await store.aclose()
    assert [w.result() for w in waiting] == [True] * 3
    reopened = SqlStore(path)
    try:
        assert reopened.total_usage() == (3, 3.0)
    finally:
        reopened.close()


def blocked_writes(
    store: AsyncStore, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event]:
    """(entered, release): the store's thread stops in its next write, says so on
    entered, and writes once release is set."""
    entered, release = threading.Event(), threading.Event()
    write = store.sync.record_usages

    def held(bills: Sequence[Bill]) -> list[bool]:
        entered.set()
        release.wait(30)
        return write(bills)

    monkeypatch.setattr(store.sync, "record_usages", held)
    return entered, release


async def test_bills_waiting_for_their_write_count_once_in_the_windows(
    store: AsyncStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = blocked_writes(store, monkeypatch)
    budgets = Budgets(store, cache_ttl_s=0.0)  # every check reads the ledger
    caller = Caller("k", "t", "pro")
    tier = Tier("pro", 3, 0, (Window("5h", 5 * 3600, 10.0),))
    try:
        first = budgets.charge(budgets.bill("first", caller, "VisionService", 1.0))  # being written
        await asyncio.to_thread(entered.wait, 30)
        # The second waits its turn:
        second = budgets.charge(budgets.bill("second", caller, "VisionService", 0.5))
        remaining = asyncio.ensure_future(budgets.remaining(caller, tier))
        usage = asyncio.ensure_future(budgets.window_usage("t", tier.windows[0], time.time()))
        await asyncio.sleep(0.05)  # the reads are behind the first write
        release.set()
        assert await remaining == pytest.approx(8.5)  # first from its row, second waiting
        assert (await usage).used_gpu_seconds == pytest.approx(1.5)
        assert await first and await second
        assert await budgets.remaining(caller, tier) == pytest.approx(8.5)
        again = budgets.bill("first", caller, "VisionService", 1.0)  # the same computation
        assert not await budgets.record(again)
        assert await budgets.remaining(caller, tier) == pytest.approx(8.5)
    finally:
        release.set()


async def test_a_bill_charged_while_the_windows_are_read_still_counts(
    store: AsyncStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = blocked_writes(store, monkeypatch)
    budgets = Budgets(store, cache_ttl_s=3600.0)  # what the first read finds stays
    caller = Caller("k", "t", "pro")
    tier = Tier("pro", 3, 0, (Window("5h", 5 * 3600, 10.0),))
    try:
        first = budgets.charge(budgets.bill("first", caller, "VisionService", 1.0))  # being written
        await asyncio.to_thread(entered.wait, 30)
        remaining = asyncio.ensure_future(budgets.remaining(caller, tier))  # behind it
        await asyncio.sleep(0.05)
        # Charged after the read was queued:
        during = budgets.charge(budgets.bill("during", caller, "VisionService", 0.5))
        release.set()
        assert await remaining == pytest.approx(8.5)
        assert await first and await during
        assert await budgets.remaining(caller, tier) == pytest.approx(8.5)  # as cached
    finally:
        release.set()
