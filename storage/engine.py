"""Database engines: URL normalisation, SQLite pragmas, the async engine the bot runs on,
the sync engine the CLI, Alembic and the bot on SQLite use, and `Database`, the handle passed around.

SQLite: WAL, `synchronous=FULL`, a busy timeout, foreign keys on, and `BEGIN IMMEDIATE` for
every transaction so a read-then-write never fails with SQLITE_BUSY. PostgreSQL: psycopg 3.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 10_000
BACKGROUND_CONNECTIONS = 8


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


def _sqlite_connect_listeners(sync_engine: sa.Engine) -> None:
    @sa.event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN IMMEDIATE is ours to emit.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


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
    # No pre-ping round trip per checkout: a connection found dead fails its transaction (the
    # platform redelivers, the sweeper retries) and the pool replaces it.
    return create_async_engine(urls.async_url, pool_size=20, max_overflow=40, pool_recycle=1800)


class InlineSession:
    """The part of `AsyncSession` the bot uses, over a synchronous SQLite session run inline.

    SQLite statements take microseconds; running them on the event loop thread avoids the thread
    hand-offs of an async driver (measured ~4x faster per transaction in `benchmarks/`). Transaction
    bodies never suspend, so holding SQLite's write lock never blocks other coroutines for long.
    """

    def __init__(self, session: Session) -> None:
        self._session = session

    @property
    def bind(self) -> Any:
        return self._session.bind

    @property
    def info(self) -> dict[str, Any]:
        return self._session.info

    def add(self, instance: object) -> None:
        self._session.add(instance)

    def add_all(self, instances: Iterable[object]) -> None:
        self._session.add_all(instances)

    async def get(self, entity: Any, ident: Any, **kwargs: Any) -> Any:
        return self._session.get(entity, ident, **kwargs)

    async def execute(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        return self._session.execute(statement, params, **kwargs)

    async def flush(self) -> None:
        self._session.flush()


class Database:
    """The database handle the bot's components share (through the context, never a global).

    `transaction()` yields an `AsyncSession` (PostgreSQL, psycopg's native asyncio) or an
    `InlineSession` (SQLite); both offer `get`, `execute`, `add`, `add_all` and `flush`.
    """

    def __init__(self, url: str) -> None:
        self.urls = normalise_url(url)
        if self.urls.is_sqlite:
            self.sync_engine: sa.Engine | None = make_sync_engine(self.urls)
            self._sync_sessions = sessionmaker(self.sync_engine, expire_on_commit=False)
            self.engine: AsyncEngine | None = None
            # SQLite has one writer at a time: our own writers queue here (FIFO, no polling);
            # other processes wait on the busy timeout.
            self._write_lock: asyncio.Lock | None = asyncio.Lock()
        else:
            self.sync_engine = None
            self.engine = make_async_engine(self.urls)
            self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
            self._write_lock = None
        self._after_audit: list[Callable[[], None]] = []
        # Acks first: background work (agent runs, sweeps, chaining) passes this gate before it
        # reaches the database; the ack paths (`urgent=True`) go straight through, so a burst of
        # runs never makes Slack or Feishu wait for their answer.
        self._background = asyncio.Semaphore(1 if self.urls.is_sqlite else BACKGROUND_CONNECTIONS)

    @property
    def is_sqlite(self) -> bool:
        return self.urls.is_sqlite

    def after_audit_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every commit that staged audit rows (the chainer's wake-up)."""
        self._after_audit.append(callback)

    @asynccontextmanager
    async def transaction(self, *, urgent: bool = False) -> AsyncIterator[Any]:
        """One transaction: committed on success, rolled back on any exception.

        `urgent=True` is for work a platform is waiting on (recording a message, a click)."""
        if not urgent:
            async with self._background, self.transaction(urgent=True) as session:
                yield session
            return
        if self._write_lock is None:
            async with self._sessions() as session:
                async with session.begin():
                    yield session
                staged = session.info.pop("audit_staged", False)
        else:
            async with self._write_lock:
                with self._sync_sessions() as sync_session:
                    with sync_session.begin():
                        yield InlineSession(sync_session)
                    staged = sync_session.info.pop("audit_staged", False)
        if staged:
            for callback in self._after_audit:
                callback()

    async def dispose(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
        if self.sync_engine is not None:
            self.sync_engine.dispose()
