"""Durable state of the gateway: API keys (hashes only), the usage ledger, and
the DreamBooth jobs it saw created (until each is billed).

One SQL implementation serves SQLite (the one-machine default, a file) and
PostgreSQL (a ``postgresql://`` DSN, for several gateway replicas); they
differ only in the connection and the placeholder style. Each ledger row is
keyed by the gateway's own id of the call or job, so recording the same
computation twice bills it once.

The store's methods are synchronous and fast; :class:`AsyncStore` runs them
on one dedicated thread so the event loop never waits on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        tenant TEXT NOT NULL,
        tier TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    )""",
    # One row per computation, keyed by the id the gateway gave it (a call, or
    # a training job); the caller's request id is only traced, never a key.
    """CREATE TABLE IF NOT EXISTS gpu_ledger (
        ledger_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        tier TEXT NOT NULL,
        service TEXT NOT NULL,
        gpu_seconds DOUBLE PRECISION NOT NULL,
        recorded_at DOUBLE PRECISION NOT NULL,
        request_id TEXT NOT NULL DEFAULT '',
        estimated BOOLEAN NOT NULL DEFAULT FALSE
    )""",
    "CREATE INDEX IF NOT EXISTS gpu_ledger_by_tenant ON gpu_ledger (tenant, recorded_at)",
    # Every training job the gateway saw created, so that it is billed when it
    # ends whether or not anyone looks at it again (billed_at: done, billed or not).
    """CREATE TABLE IF NOT EXISTS training_jobs (
        job_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        tier TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        billed_at DOUBLE PRECISION
    )""",
    "CREATE INDEX IF NOT EXISTS training_jobs_unbilled ON training_jobs (billed_at, created_at)",
)
# Version 1's ledger was keyed by the caller's request id (a caller who sent
# the same id every time was billed once); its rows move to gpu_ledger as they are.
_MIGRATE_V1 = (
    "INSERT INTO gpu_ledger (ledger_id, tenant, tier, service, gpu_seconds, recorded_at, "
    "request_id) SELECT request_id, tenant, tier, service, gpu_seconds, recorded_at, request_id "
    "FROM usage_ledger WHERE true ON CONFLICT (ledger_id) DO NOTHING",  # WHERE: SQLite's parser
    "DROP TABLE usage_ledger",
)
# Version 2's ledger had no estimated column (every row was a backend's report).
_MIGRATE_V2 = ("ALTER TABLE gpu_ledger ADD COLUMN estimated BOOLEAN NOT NULL DEFAULT FALSE",)


@dataclass(frozen=True)
class Bill:
    """One ledger row to write: what a computation spent."""

    ledger_id: str
    tenant: str
    tier: str
    service: str
    gpu_seconds: float
    at: float
    request_id: str = ""
    estimated: bool = False

    def entry(self) -> UsageEntry:
        """The ledger's entry it becomes."""
        return UsageEntry(
            self.ledger_id, self.request_id, self.gpu_seconds, self.at, self.estimated
        )

    def row(self) -> tuple[Any, ...]:
        """The values in the ledger's column order."""
        return (
            self.ledger_id,
            self.tenant,
            self.tier,
            self.service,
            self.gpu_seconds,
            self.at,
            self.request_id,
            self.estimated,
        )


@dataclass(frozen=True)
class KeyRow:
    """A stored API key: everything but the secret, which is kept as a hash."""

    key_id: str
    secret_hash: str
    tenant: str
    tier: str
    description: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class UsageEntry:
    """One metered computation."""

    ledger_id: str
    """The gateway's id of the call (``call:...``) or job (``job:...``)."""
    request_id: str
    """The caller's request id, traced; empty when it sent none."""
    gpu_seconds: float
    recorded_at: float
    estimated: bool = False
    """True when the backend could not report (it died mid-call) and the gateway
    billed an estimate from the elapsed time and the call's device share."""


@dataclass(frozen=True)
class JobRow:
    """A training job the gateway saw created and has not yet billed."""

    job_id: str
    tenant: str
    tier: str
    created_at: float


class SqlStore:
    """Keys and ledger in SQLite or PostgreSQL."""

    def __init__(self, database: str) -> None:
        self._lock = threading.Lock()
        if database.startswith(("postgresql://", "postgres://")):
            import psycopg

            self._conn: Any = psycopg.connect(database, autocommit=True)
            self._placeholder = "%s"
            self.unavailable: tuple[type[Exception], ...] = (psycopg.OperationalError,)
            """What the driver raises when the database itself fails (locked, gone,
            out of space), as opposed to one statement's data."""
        else:
            if database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._placeholder = "?"
            self.unavailable = (sqlite3.OperationalError,)
        for statement in _SCHEMA:
            self._execute(statement)
        if "estimated" not in self._columns("gpu_ledger"):
            for statement in _MIGRATE_V2:
                self._execute(statement)
        if self._has_table("usage_ledger"):
            for statement in _MIGRATE_V1:
                self._execute(statement)

    def _has_table(self, name: str) -> bool:
        if self._placeholder == "?":
            sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?"
        else:
            sql = (
                "SELECT tablename FROM pg_tables "
                "WHERE schemaname = current_schema() AND tablename = ?"
            )
        return bool(self._execute(sql, (name,)))

    def _columns(self, table: str) -> set[str]:
        if self._placeholder == "?":
            return {str(r[1]) for r in self._execute(f"PRAGMA table_info({table})")}
        sql = (
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?"
        )
        return {str(r[0]) for r in self._execute(sql, (table,))}

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            cursor = self._conn.execute(sql.replace("?", self._placeholder), params)
            rows = cursor.fetchall() if cursor.description else []
            return [tuple(r) for r in rows]

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def create_key(self, row: KeyRow) -> None:
        """Store a new key."""
        self._execute(
            "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                row.key_id,
                row.secret_hash,
                row.tenant,
                row.tier,
                row.description,
                row.created_at,
                row.revoked_at,
            ),
        )

    def get_key(self, key_id: str) -> KeyRow | None:
        """The key with this id, revoked or not."""
        rows = self._execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,))
        return KeyRow(*rows[0]) if rows else None

    def list_keys(self, tenant: str, include_revoked: bool) -> list[KeyRow]:
        """Keys, oldest first, optionally of one tenant."""
        sql = "SELECT * FROM api_keys WHERE (? = '' OR tenant = ?)"
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        rows = self._execute(sql + " ORDER BY created_at, key_id", (tenant, tenant))
        return [KeyRow(*r) for r in rows]

    def revoke_key(self, key_id: str, at: float) -> KeyRow | None:
        """Revoke a key (idempotent); None if it does not exist."""
        self._execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
            (at, key_id),
        )
        return self.get_key(key_id)

    def record_usage(
        self,
        ledger_id: str,
        tenant: str,
        tier: str,
        service: str,
        gpu_seconds: float,
        at: float,
        request_id: str = "",
        estimated: bool = False,
    ) -> bool:
        """Bill a computation once; False when this ledger id was already billed."""
        bill = Bill(ledger_id, tenant, tier, service, gpu_seconds, at, request_id, estimated)
        return self.record_usages([bill])[0]

    def record_usages(self, bills: Sequence[Bill]) -> list[bool]:
        """Bill computations in one transaction, each once: for each, False when
        its ledger id was already billed. All of them are written, or none."""
        sql = (
            "INSERT INTO gpu_ledger (ledger_id, tenant, tier, service, gpu_seconds, "
            "recorded_at, request_id, estimated) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (ledger_id) DO NOTHING RETURNING ledger_id"
        ).replace("?", self._placeholder)
        with self._lock, self._transaction():
            return [bool(self._conn.execute(sql, bill.row()).fetchall()) for bill in bills]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._placeholder != "?":  # psycopg: its own transaction block
            with self._conn.transaction():
                yield
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # SQLite may have rolled back by itself
                self._conn.execute("ROLLBACK")
            raise

    def usage_since(self, tenant: str, since: float) -> float:
        """GPU-seconds the tenant used since a time."""
        rows = self._execute(
            "SELECT COALESCE(SUM(gpu_seconds), 0) FROM gpu_ledger "
            "WHERE tenant = ? AND recorded_at >= ?",
            (tenant, since),
        )
        return float(rows[0][0])

    def usage_entries(self, tenant: str, since: float) -> list[UsageEntry]:
        """The tenant's metered computations since a time, oldest first."""
        rows = self._execute(
            "SELECT ledger_id, request_id, gpu_seconds, recorded_at, estimated FROM gpu_ledger "
            "WHERE tenant = ? AND recorded_at >= ? ORDER BY recorded_at",
            (tenant, since),
        )
        return [
            UsageEntry(str(r[0]), str(r[1]), float(r[2]), float(r[3]), bool(r[4])) for r in rows
        ]

    def remember_job(self, job_id: str, tenant: str, tier: str, at: float) -> None:
        """Note a training job to bill when it ends (seeing it again changes nothing)."""
        self._execute(
            "INSERT INTO training_jobs (job_id, tenant, tier, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (job_id) DO NOTHING",
            (job_id, tenant, tier, at),
        )

    def unbilled_jobs(
        self, tenant: str = "", after: tuple[float, str] = (-1.0, ""), limit: int = 1000
    ) -> list[JobRow]:
        """Jobs not yet billed, of one tenant or all, in creation order from after
        (a job's created_at and job_id, exclusive)."""
        rows = self._execute(
            "SELECT job_id, tenant, tier, created_at FROM training_jobs "
            "WHERE billed_at IS NULL AND (? = '' OR tenant = ?) "
            "AND (created_at > ? OR (created_at = ? AND job_id > ?)) "
            "ORDER BY created_at, job_id LIMIT ?",
            (tenant, tenant, after[0], after[0], after[1], limit),
        )
        return [JobRow(str(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows]

    def mark_job_billed(self, job_id: str, at: float) -> None:
        """A job is done with: billed (here or elsewhere), or gone."""
        self._execute(
            "UPDATE training_jobs SET billed_at = ? WHERE job_id = ? AND billed_at IS NULL",
            (at, job_id),
        )

    def total_usage(self) -> tuple[int, float]:
        """Rows and GPU-seconds in the whole ledger (for checks and tests)."""
        rows = self._execute("SELECT COUNT(*), COALESCE(SUM(gpu_seconds), 0) FROM gpu_ledger")
        return int(rows[0][0]), float(rows[0][1])


class AsyncStore:
    """Runs a :class:`SqlStore` on one dedicated thread.

    Bills are written in groups: the bills that come while one write is under
    way go together in the next (one transaction, one trip to the thread, up to
    BILLS_PER_WRITE), so a busy gateway writes its ledger in fewer, larger
    transactions instead of queueing one trip per call behind the others. A
    bill waiting for its write already counts in the tenant's usage
    (usage_since, usage_entries)."""

    BILLS_PER_WRITE = 256

    def __init__(self, store: SqlStore) -> None:
        self.sync = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-store")
        self._bills: list[tuple[Bill, asyncio.Future[bool]]] = []
        self._writing: asyncio.Task[None] | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a store method off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def record_usage(self, bill: Bill) -> bool:
        """Bill a computation once (with whatever other bills are waiting); False
        when its ledger id was already billed."""
        return await self.queue_usage(bill)

    def queue_usage(self, bill: Bill) -> asyncio.Future[bool]:
        """Put a bill in the next group write; the future says once it is written
        (False: its ledger id was already billed)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._bills.append((bill, done))
        if self._writing is None:  # in a context of its own, not the first caller's
            self._writing = loop.create_task(self._write_bills(), context=contextvars.Context())
        return done

    def _waiting(self, tenant: str, since: float) -> list[Bill]:
        return [bill for bill, _ in self._bills if bill.tenant == tenant and bill.at >= since]

    async def usage_since(self, tenant: str, since: float) -> float:
        """GPU-seconds billed to tenant since (Unix time), the bills still waiting
        for their write included. The store's one thread runs the read after the
        group being written now and before the bills still waiting, which are
        counted here instead, so each bill counts once."""
        waiting = sum(bill.gpu_seconds for bill in self._waiting(tenant, since))
        return waiting + await self.run(self.sync.usage_since, tenant, since)

    async def usage_entries(self, tenant: str, since: float) -> list[UsageEntry]:
        """The tenant's computations since (Unix time), oldest first, the bills
        still waiting for their write included (each once, as usage_since)."""
        waiting = [bill.entry() for bill in self._waiting(tenant, since)]
        stored = await self.run(self.sync.usage_entries, tenant, since)
        return sorted(stored + waiting, key=lambda entry: entry.recorded_at)

    async def _write_bills(self) -> None:
        batch: list[tuple[Bill, asyncio.Future[bool]]] = []
        try:
            while self._bills:
                batch = self._bills[: self.BILLS_PER_WRITE]
                del self._bills[: self.BILLS_PER_WRITE]
                outcomes = await self._write(batch)
                for (_, done), outcome in zip(batch, outcomes, strict=True):
                    if done.done():
                        continue
                    if isinstance(outcome, Exception):
                        done.set_exception(outcome)
                    else:
                        done.set_result(outcome)
                batch = []
        finally:
            self._writing = None
            stopped = RuntimeError("the ledger's writer stopped before this bill was written")
            for _, done in batch + self._bills:  # only if this task itself was cancelled
                if not done.done():
                    done.set_exception(stopped)
            self._bills = []

    async def _write(
        self, batch: list[tuple[Bill, asyncio.Future[bool]]]
    ) -> list[bool | Exception]:
        bills = [bill for bill, _ in batch]
        try:
            return await self.run(self._group, bills)
        except Exception as error:
            return [error] * len(bills)

    def _group(self, bills: list[Bill]) -> list[bool | Exception]:
        """On the store's thread: the bills in one transaction, or, when one bill's
        data fails it, each on its own in the same trip (no read comes between
        the two and finds the group neither waiting nor written)."""
        try:
            return list(self.sync.record_usages(bills))
        except self.sync.unavailable as error:  # the database failed: each would too
            return [error] * len(bills)
        except Exception as error:
            if len(bills) == 1:
                return [error]
        # One bad bill must not cost the others theirs: each on its own.
        return self._each(bills)

    def _each(self, bills: list[Bill]) -> list[bool | Exception]:
        outcomes: list[bool | Exception] = []
        for bill in bills:
            try:
                outcomes.append(self.sync.record_usages([bill])[0])
            except Exception as error:
                outcomes.append(error)
        return outcomes

    async def aclose(self) -> None:
        """Write the bills still waiting, then close (the gateway's last step)."""
        while self._writing is not None:
            await asyncio.shield(self._writing)
        self.close()

    def close(self) -> None:
        """Finish pending work and close the connection."""
        self._executor.shutdown(wait=True)
        self.sync.close()
