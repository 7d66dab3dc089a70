"""Database engines: URL normalisation, SQLite pragmas, the async engine the bot runs on,
the sync engine the CLI and Alembic use, and `Database`, the handle passed around in the context.

SQLite: WAL, `synchronous=FULL`, a busy timeout, foreign keys on, and `BEGIN IMMEDIATE` for
every transaction so a read-then-write never fails with SQLITE_BUSY. PostgreSQL: psycopg 3.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

SQLITE_BUSY_TIMEOUT_MS = 10_000


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
    return create_async_engine(urls.async_url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Database:
    """The async database handle the bot's components share (through the context, never a global)."""

    def __init__(self, url: str) -> None:
        self.urls = normalise_url(url)
        self.engine = make_async_engine(self.urls)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.urls.is_sqlite

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One transaction: committed on success, rolled back on any exception."""
        async with self._sessions() as session, session.begin():
            yield session

    async def dispose(self) -> None:
        await self.engine.dispose()
