"""Database engines and `Database`, the handle passed around: URL normalisation, SQLite pragmas,
the async engine the bot runs on, the sync engine the CLI and Alembic use, and the one retry
layer for transient database faults.

SQLite runs off the event loop (aiosqlite: one thread per connection), in WAL mode with
`synchronous=FULL`. Write transactions take `BEGIN IMMEDIATE` (a read-then-write never fails
with SQLITE_BUSY half-way); read transactions take a plain `BEGIN` and never wait for the write
lock. Work a platform is waiting on (an ack) waits at most `URGENT_LOCK_WAIT` for the lock and
then fails, so the platform redelivers; background work waits longer and is retried.
PostgreSQL: psycopg 3, native asyncio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

SQLITE_BUSY_TIMEOUT_MS = 5_000
URGENT_BUSY_TIMEOUT_MS = 1_000
URGENT_LOCK_WAIT = 1.0
MIN_BUSY_MS = 50
BACKGROUND_CONNECTIONS = 8
RETRY_DEADLINE = 60.0
URGENT_RETRY_DEADLINE = 0.5
# SQLSTATE classes and codes that mean "try the whole transaction again": connection exceptions,
# transaction rollbacks (serialization failure, deadlock), lock not available, admin shutdown.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40")
_TRANSIENT_SQLSTATES = frozenset({"55P03", "57P01", "57P02", "57P03", "53300"})

T = TypeVar("T")


@dataclass(frozen=True)
class DatabaseUrls:
    """The same database as seen by the async driver (the bot) and the sync driver (CLI, Alembic)."""

    async_url: URL
    sync_url: URL

    @property
    def is_sqlite(self) -> bool:
        return self.sync_url.get_backend_name() == "sqlite"


def normalise_url(url: str) -> DatabaseUrls:
    """Map any SQLAlchemy URL the user gives to our async and sync drivers."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return DatabaseUrls(parsed.set(drivername="sqlite+aiosqlite"), parsed.set(drivername="sqlite"))
    if backend == "postgresql":
        driver = parsed.set(drivername="postgresql+psycopg")
        return DatabaseUrls(driver, driver)
    # Any other SQLAlchemy backend: trust the user's driver for both (it must be async-capable).
    return DatabaseUrls(parsed, parsed)


def is_transient(exc: BaseException) -> bool:
    """True for faults that a fresh attempt of the same transaction can get past: a dropped or
    terminated connection, a lock or busy timeout, a serialization failure, a read-only or
    locked SQLite file, a pool checkout timeout."""
    if isinstance(exc, sa.exc.TimeoutError | ConnectionError):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        state = getattr(exc.orig, "sqlstate", None)
        if state:
            return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES
        return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)
    return False


def _sqlite_connect_listeners(sync_engine: sa.Engine) -> None:
    @sa.event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        # Take transaction control away from the driver so BEGIN is ours to emit.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
        record.info["busy_ms"] = SQLITE_BUSY_TIMEOUT_MS

    @sa.event.listens_for(sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        options = conn.get_execution_options()
        busy = int(options.get("chatops_busy_ms", SQLITE_BUSY_TIMEOUT_MS))
        info = conn.connection.info
        if info.get("busy_ms") != busy:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={busy}")
            info["busy_ms"] = busy
        conn.exec_driver_sql("BEGIN" if options.get("chatops_read") else "BEGIN IMMEDIATE")


def make_sync_engine(urls: DatabaseUrls) -> sa.Engine:
    """A synchronous engine for the CLI and for migrations."""
    if urls.is_sqlite:
        engine = sa.create_engine(urls.sync_url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _sqlite_connect_listeners(engine)
        return engine
    return sa.create_engine(urls.sync_url, pool_pre_ping=True)


def make_async_engine(urls: DatabaseUrls) -> AsyncEngine:
    """The engine the running bot uses."""
    if urls.is_sqlite:
        engine = create_async_engine(
            urls.async_url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, pool_size=8, max_overflow=8
        )
        _sqlite_connect_listeners(engine.sync_engine)
        return engine
    # No pre-ping round trip per checkout: a connection found dead fails its attempt, the pool
    # replaces it and the retry layer runs the transaction again.
    return create_async_engine(urls.async_url, pool_size=20, max_overflow=40, pool_recycle=1800, pool_timeout=10)


class LockBusy(Exception):
    """The SQLite write lock stayed busy longer than an ack may wait (the platform redelivers)."""


class Database:
    """The database handle the bot's components share (through the context, never a global).

    `transaction()` yields an `AsyncSession`; `run(fn)` runs `fn(session)` in a transaction and
    runs it again, from the start, on a transient fault (the one retry layer).
    """

    def __init__(self, url: str) -> None:
        self.urls = normalise_url(url)
        self.engine: AsyncEngine = make_async_engine(self.urls)
        if self.urls.is_sqlite:
            self._urgent = async_sessionmaker(
                self.engine.execution_options(chatops_busy_ms=URGENT_BUSY_TIMEOUT_MS), expire_on_commit=False
            )
            self._reads = async_sessionmaker(self.engine.execution_options(chatops_read=True), expire_on_commit=False)
            # SQLite has one writer at a time: our own writers queue here (FIFO, no busy polling);
            # other processes are waited for by the busy timeout, in the connection's thread.
            self._write_lock: asyncio.Lock | None = asyncio.Lock()
        else:
            self._urgent = async_sessionmaker(self.engine, expire_on_commit=False)
            self._reads = self._urgent
            self._write_lock = None
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._after_commit: dict[str, list[Callable[[], None]]] = {}
        # Acks first: background work passes this gate before it reaches the database; the ack
        # paths (`urgent=True`) go straight through, so a burst of runs never makes a platform wait.
        self._background = asyncio.Semaphore(1 if self.urls.is_sqlite else BACKGROUND_CONNECTIONS)

    @property
    def is_sqlite(self) -> bool:
        return self.urls.is_sqlite

    @property
    def sync_engine(self) -> sa.Engine:
        return self.engine.sync_engine

    def after_audit_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every commit that staged audit rows (the chainer's wake-up)."""
        self.after_commit("audit_staged", callback)

    def after_commit(self, flag: str, callback: Callable[[], None]) -> None:
        """Call `callback` after every commit whose session set `session.info[flag]`."""
        self._after_commit.setdefault(flag, []).append(callback)

    @asynccontextmanager
    async def transaction(self, *, urgent: bool = False, read: bool = False) -> AsyncIterator[AsyncSession]:
        """One transaction: committed on success, rolled back on any exception.

        `urgent=True` is for work a platform is waiting on (recording a message, a click): it skips
        the background gate and waits only briefly for SQLite's write lock (`LockBusy`).
        `read=True` never takes the write lock (SQLite: a deferred `BEGIN`, WAL readers don't block)."""
        if read:
            async with self._reads() as session, session.begin():
                yield session
            return
        if not urgent:
            async with self._background, self._write(self._sessions) as session:
                yield session
            return
        async with self._write(self._urgent, wait=URGENT_LOCK_WAIT) as session:
            yield session

    @asynccontextmanager
    async def _write(self, sessions: async_sessionmaker[AsyncSession], wait: float | None = None) -> AsyncIterator[AsyncSession]:
        options: dict[str, Any] = {}
        if self._write_lock is not None:
            started = time.monotonic()
            try:
                async with asyncio.timeout(wait):  # not wait_for: it can lose an acquired lock on 3.11
                    await self._write_lock.acquire()
            except TimeoutError:
                raise LockBusy("the database is busy") from None
            if wait is not None:  # one budget: what is left of it is all SQLite's busy timeout may wait
                left_ms = max(MIN_BUSY_MS, round((wait - (time.monotonic() - started)) * 1000, -1))
                options["bind"] = self.engine.execution_options(chatops_busy_ms=int(left_ms))
        try:
            async with sessions(**options) as session:
                async with session.begin():
                    yield session

                raised = [flag for flag in self._after_commit if session.info.pop(flag, False)]
        finally:
            if self._write_lock is not None:
                self._write_lock.release()
        for flag in raised:
            for callback in self._after_commit[flag]:
                callback()

    def attempts(self, *, urgent: bool = False, deadline: float | None = None) -> AsyncRetrying:
        """The retry policy for one database step (tenacity): transient faults only, bounded backoff."""
        limit = deadline if deadline is not None else URGENT_RETRY_DEADLINE if urgent else RETRY_DEADLINE
        return AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential_jitter(initial=0.05, max=2.0),
            stop=stop_after_delay(limit),
            reraise=True,
        )

    async def run(
        self,
        step: Callable[[AsyncSession], Awaitable[T]],
        *,
        urgent: bool = False,
        read: bool = False,
        deadline: float | None = None,
    ) -> T:
        """`step(session)` in one transaction, attempted again from the start on transient faults.

        `step` must be safe to run more than once: everything it does happens inside the
        transaction, which a failed attempt rolled back."""
        async for attempt in self.attempts(urgent=urgent, deadline=deadline):
            with attempt:
                async with self.transaction(urgent=urgent, read=read) as session:
                    return await step(session)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def dispose(self) -> None:
        await self.engine.dispose()
