"""Database engines and `Database`, the handle passed around: URL normalisation, SQLite pragmas,
the async engine the bot runs on, the sync engine the CLI and Alembic use, and the one retry
layer for transient database faults.

SQLite, in WAL mode with `synchronous=FULL`: the event loop never waits on SQLite's lock. A write
transaction takes `BEGIN IMMEDIATE` without any busy wait (`busy_timeout=0`); while another
connection or process holds the lock, the attempt is repeated with `asyncio.sleep` between tries,
so every other coroutine keeps running. Work a platform is waiting on (an ack) gives up once
`URGENT_BUDGET` is spent, lock waits and retries together (`LockBusy`: the adapter answers 503
and the platform redelivers, well inside Slack's 3 s); background
work waits longer and is then retried by the retry layer. Read transactions take a plain `BEGIN`
and never wait for the write lock (WAL readers neither block nor are blocked). Once the lock is
held, statements run inline: they take microseconds, and a transaction body never suspends, so
the thread hand-offs of an async driver would only slow every transaction down (measured in
`benchmarks/`); only the COMMIT, whose fsync takes milliseconds, is handed to one committer
thread, so the loop answers acks and drives other runs meanwhile. The writers keep one connection
between transactions; a transaction that fails closes it, and the next takes a fresh one from the
pool. Across processes acks go first too: an urgent writer that finds the lock busy polls at the
shortest pause and holds the turnstile meanwhile, and background writers (worker processes) do not
begin while it is held (`storage.turnstile`). A process that records acks only (a front) never
checkpoints the WAL in its commits (`checkpoints=False`: copying the WAL into the database took
100 ms and more, inside an ack); the workers' commits do. PostgreSQL: psycopg 3, native asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_before_delay, wait_random_exponential

from storage.retrying import first_then_retry
from storage.sessions import DbSession, InlineSession, PostgresSession
from storage.turnstile import Turnstile

log = logging.getLogger("chatops.storage")

SQLITE_BUSY_TIMEOUT_MS = 5_000  # the CLI's sync engine (Alembic, audit commands): plain busy waits are fine there
URGENT_BUDGET = 1.0  # seconds an ack's database step may take in all: lock waits and retries share it
BACKGROUND_LOCK_WAIT = 10.0
LOCK_POLL_FIRST, LOCK_POLL_MAX = 0.001, 0.02
LOCK_WAIT_NOTICE = 0.3  # seconds an urgent writer waits for another process's lock before `on_urgent_wait`
COMMIT_WAIT = 30.0  # seconds a cancelled writer still waits for its commit to finish (a stuck disk)
BACKGROUND_CONNECTIONS = 8
DEFAULT_POOL_SIZE = 10
RETRY_DEADLINE = 60.0
# PostgreSQL: a transaction that has not finished after this long is stalled (a hung backend, a lock
# another session holds, a network gone quiet): its connection is dropped unread and the retry layer
# tries again on a fresh one (CHATOPS_DB_STALL_SECONDS). An ack's gets the shorter bound: the platform waits 3 s.
STALL_SECONDS, URGENT_STALL_SECONDS = 30.0, 2.5
CONNECT_TIMEOUT = 10  # seconds to open a PostgreSQL connection (libpq's connect_timeout)
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
    if isinstance(exc, sa.exc.TimeoutError | ConnectionError | LockBusy):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        state = getattr(exc.orig, "sqlstate", None)
        if state:
            return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES
        return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)
    return False


def _sqlite_connect_listeners(
    sync_engine: sa.Engine, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS, checkpoints: bool = True
) -> None:
    @sa.event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN is ours to emit.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cur.execute("PRAGMA foreign_keys=ON")
        if not checkpoints:
            cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()

    @sa.event.listens_for(sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Straight to the driver: through `exec_driver_sql` each BEGIN cost as much as a whole
        # prepared statement does (`storage.prepared`), five times a turn.
        sql = "BEGIN" if conn.get_execution_options().get("chatops_read") else "BEGIN IMMEDIATE"
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]  # a live connection's
        try:
            cursor.execute(sql)
        except sqlite3.Error as exc:  # SQLAlchemy's class for it (OperationalError: the lock is busy)
            raise sa.exc.DBAPIError.instance(sql, None, exc, sqlite3.Error) from exc
        finally:
            cursor.close()


def dump_json(value: Any) -> str:
    """JSON columns, written (conversation history, payloads, audit data: several per step): orjson,
    about ten times faster than `json.dumps`; the standard library for what orjson refuses (integers
    beyond 64 bits, non-string keys), so every value stores as before."""
    try:
        return orjson.dumps(value).decode("utf-8")
    except TypeError:
        return json.dumps(value)


def _json_options() -> dict[str, Any]:
    return {"json_serializer": dump_json, "json_deserializer": orjson.loads}


def make_sync_engine(urls: DatabaseUrls, *, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS, checkpoints: bool = True) -> sa.Engine:
    """A synchronous engine: the CLI and migrations (busy waits allowed), and the bot on SQLite
    (`busy_timeout_ms=0`: the bot waits for the lock asynchronously, see `Database`; `checkpoints`:
    whether its commits may checkpoint the WAL)."""
    if urls.is_sqlite:
        engine = sa.create_engine(
            urls.sync_url, connect_args={"timeout": busy_timeout_ms / 1000}, pool_size=4, max_overflow=8, **_json_options()
        )
        _sqlite_connect_listeners(engine, busy_timeout_ms, checkpoints)
        return engine
    return sa.create_engine(urls.sync_url, pool_pre_ping=True, **_json_options())


def make_async_engine(urls: DatabaseUrls, pool_size: int = DEFAULT_POOL_SIZE, stall: float | None = None) -> AsyncEngine:
    """The engine the running bot uses on PostgreSQL (and any other async-capable backend): at most
    `2 * pool_size` connections (half of them opened only under load).

    No pre-ping round trip per checkout: a connection found dead fails its attempt, the pool
    replaces it and the retry layer runs the transaction again. `stall` (PostgreSQL): the bound of
    this process's transactions; the server ends a session left idle inside a transaction longer
    than that (`_server_bound`)."""
    engine = create_async_engine(
        urls.async_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        pool_timeout=10,
        connect_args={"connect_timeout": CONNECT_TIMEOUT},
        **_json_options(),
    )
    if stall is not None and engine.dialect.name == "postgresql":
        _server_bound(engine.sync_engine, stall)
    return engine


def _server_bound(sync_engine: sa.Engine, stall: float) -> None:
    """Every connection tells its server process to end the session when it sits idle inside a
    transaction longer than a transaction may last here (`idle_in_transaction_session_timeout`): a
    client that vanished (a network partition, a connection given up as stalled whose words never
    reached the server) then frees its row locks within that bound instead of holding them until
    TCP notices. Set once per new connection (one round trip, not one per transaction)."""
    milliseconds = math.ceil((stall + STALL_BACKSTOP) * 1000)

    @sa.event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"SET idle_in_transaction_session_timeout = {milliseconds}")
        finally:
            cursor.close()
        dbapi_conn.commit()  # a SET inside the driver's implicit transaction would be undone by its rollback


STALL_BACKSTOP = 1.0  # seconds after the bound before the task itself is cancelled (a step awaiting no statement)
END_SECONDS = 5.0  # how long ending a stalled connection's server process may take (best effort)
# A stalled connection's server process is ended from a fresh connection (`pg_terminate_backend`):
# one that waits on a lock would otherwise stay queued for it, one idle in its transaction keeps its
# locks. Not one that runs a COMMIT: that may still land (a lagging synchronous standby), and the
# retry finds what it did.
_END_STALLED = sa.text(
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE pid = :pid AND NOT (state = 'active' AND upper(left(ltrim(query), 6)) = 'COMMIT')"
)


def _shut_socket(session: PostgresSession) -> None:
    """The transaction's bound is reached: shut its connection's socket (both ways) without a word to
    the server, so that a statement in flight fails at once instead of waiting on a stalled server process."""
    with contextlib.suppress(Exception):
        raw = session.connection().sync_connection
        fd = raw.connection.driver_connection.pgconn.socket  # type: ignore[union-attr]  # a live, checked-out connection
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


def _backend_pid(session: PostgresSession) -> int | None:
    """The server process of the transaction's connection, as the driver knows it (no round trip)."""
    with contextlib.suppress(Exception):
        raw = session.connection().sync_connection
        return int(raw.connection.driver_connection.info.backend_pid)  # type: ignore[union-attr]  # a live, checked-out connection
    return None


class LockBusy(Exception):
    """The SQLite write lock stayed busy longer than the caller may wait (an ack: the platform redelivers)."""


class TransactionStalled(ConnectionError):
    """A PostgreSQL transaction did not finish within its bound; its connection was dropped (transient)."""


def _locked(exc: sa.exc.OperationalError) -> bool:
    return "locked" in str(exc.orig).lower() or "busy" in str(exc.orig).lower()


def is_locked(exc: BaseException) -> bool:
    """True when SQLite refused because another connection or process holds its lock."""
    return isinstance(exc, sa.exc.OperationalError) and _locked(exc)


class Database:
    """The database handle the bot's components share (through the context, never a global).

    `transaction()` yields a `PostgresSession` or an `InlineSession` (SQLite), both `DbSession`s
    (`storage.sessions`). `run(fn)` runs `fn(session)` in a transaction and runs it again, from the
    start, on a transient fault (the one retry layer). `checkpoints=False` (SQLite): this process's
    commits never checkpoint the WAL (a front's: other processes' commits do).
    """

    def __init__(
        self, url: str, *, pool_size: int = DEFAULT_POOL_SIZE, checkpoints: bool = True, stall: float = STALL_SECONDS
    ) -> None:
        self.urls = normalise_url(url)
        self.stall = stall  # PostgreSQL: seconds after which an unfinished transaction is given up
        self._after_commit: dict[str, list[Callable[[Any], None]]] = {}
        self._on_retry: list[Callable[[BaseException], None]] = []
        self._ending: set[asyncio.Task[None]] = set()  # server processes of stalled connections being ended
        # SQLite: called once while an urgent writer has waited `LOCK_WAIT_NOTICE` for another process's lock.
        self._on_urgent_wait: Callable[[], None] | None = None
        if self.urls.is_sqlite:
            self.sync_engine = make_sync_engine(self.urls, busy_timeout_ms=0, checkpoints=checkpoints)
            self._turnstile = Turnstile(self.urls.sync_url.database)
            self._sync_sessions = sessionmaker(self.sync_engine, expire_on_commit=False)
            self._read_engine = self.sync_engine.execution_options(chatops_read=True)
            self.engine: AsyncEngine | None = None
            # SQLite has one writer at a time: our own writers queue here (FIFO); other processes
            # are waited for by polling (`_begin_sqlite`), never by a busy wait on the loop.
            self._write_lock: asyncio.Lock | None = asyncio.Lock()
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-commit")
            # The writers' connection, kept between transactions (taking one from the pool and giving
            # it back cost more than most transactions' statements); closed after any failure.
            self._writer: sa.Connection | None = None
        else:
            self.engine = make_async_engine(self.urls, pool_size, stall)
            self.sync_engine = self.engine.sync_engine
            self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
            self._write_lock = None
        # Acks first: background work passes this gate before it reaches the database; the ack
        # paths (`urgent=True`) go straight through, so a burst of runs never makes a platform wait.
        # Background work leaves at least one pooled connection to the ack paths.
        background = 1 if self.urls.is_sqlite else max(1, min(BACKGROUND_CONNECTIONS, pool_size - 1))
        self._background = asyncio.Semaphore(background)

    @property
    def is_sqlite(self) -> bool:
        return self.urls.is_sqlite

    def on_urgent_wait(self, callback: Callable[[], None]) -> None:
        """SQLite: call `callback` when an urgent writer (an ack) has waited `LOCK_WAIT_NOTICE` for a
        write lock another process holds (a front looks whether a worker of its own is stuck holding it)."""
        self._on_urgent_wait = callback

    def after_audit_commit(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every commit that staged audit rows (the chainer's wake-up)."""
        self.after_commit("audit_staged", callback)

    def on_retry(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(fault)` each time a step is attempted again after a transient fault."""
        self._on_retry.append(callback)

    def _retrying(self, state: RetryCallState) -> None:
        fault = state.outcome.exception() if state.outcome is not None else None
        if fault is not None:
            for callback in self._on_retry:
                callback(fault)

    def after_commit(self, flag: str, callback: Callable[[], None]) -> None:
        """Call `callback` after every commit whose session set `session.info[flag]`."""
        self.after_commit_value(flag, lambda _value: callback())

    def after_commit_value(self, key: str, callback: Callable[[Any], None]) -> None:
        """Call `callback(session.info[key])` after every commit whose session set that key (to
        something true): what a transaction leaves for after its commit, e.g. jobs it claimed."""
        self._after_commit.setdefault(key, []).append(callback)

    @asynccontextmanager
    async def transaction(
        self, *, urgent: bool = False, read: bool = False, lock_wait: float = URGENT_BUDGET, stall: float | None = None
    ) -> AsyncIterator[DbSession]:
        """One transaction: committed on success, rolled back on any exception.

        `urgent=True` is for work a platform is waiting on (recording a message, a click): it skips
        the background gate and waits at most `lock_wait` for SQLite's write lock (`LockBusy`).
        `read=True` never takes the write lock. `stall` (PostgreSQL): a shorter bound than this
        handle's for this transaction."""
        if read:
            async with self._read(urgent=urgent, stall=stall) as session:
                yield session
            return
        if urgent:
            async with self._write(lock_wait, urgent=True, stall=stall) as session:
                yield session
            return
        async with self._background, self._write(BACKGROUND_LOCK_WAIT, stall=stall) as session:
            yield session

    def _bound(self, urgent: bool, stall: float | None) -> float:
        """Seconds a PostgreSQL transaction may take: this handle's bound, an ack's, the caller's."""
        bound = min(URGENT_STALL_SECONDS, self.stall) if urgent else self.stall
        return bound if stall is None else min(bound, stall)

    @asynccontextmanager
    async def _read(self, *, urgent: bool = False, stall: float | None = None) -> AsyncIterator[DbSession]:
        if self.engine is not None:
            async with self._postgres(self._bound(urgent, stall)) as session:
                yield session
            return
        inline = InlineSession(self._read_engine.connect(), self._sync_sessions)
        try:
            inline.connection().begin()
            yield inline
            inline.commit()
        finally:
            inline.close()

    @asynccontextmanager
    async def _write(self, wait: float, *, urgent: bool = False, stall: float | None = None) -> AsyncIterator[DbSession]:
        if self.engine is not None:
            async with self._postgres(self._bound(urgent, stall)) as session:
                yield session
            raised = self._raised(session.info)
        else:
            assert self._write_lock is not None
            deadline = asyncio.get_running_loop().time() + wait
            if not urgent:
                await self._turnstile_passed(deadline)
            try:
                async with asyncio.timeout_at(deadline):  # not wait_for: it can lose an acquired lock on 3.11
                    await self._write_lock.acquire()
            except TimeoutError:
                raise LockBusy("the database is busy") from None
            try:
                inline = InlineSession(await self._begin_sqlite(deadline, urgent=urgent), self._sync_sessions)
                committed = False
                try:
                    async with self._committing(inline):
                        yield inline
                    committed = True
                finally:
                    if committed:
                        self._writer = inline.detach()
                    else:
                        inline.close()
                raised = self._raised(inline.info)
            finally:
                self._write_lock.release()
        for flag, value in raised:
            for callback in self._after_commit[flag]:
                callback(value)

    @asynccontextmanager
    async def _postgres(self, stall: float) -> AsyncIterator[PostgresSession]:
        """One PostgreSQL transaction: committed on success, rolled back on any exception. Not
        finished within `stall` seconds, it is given up: its connection is dropped without a word to
        the server (a ROLLBACK would wait on the same stalled backend), the pool's idle connections are
        replaced, and `TransactionStalled` raised (transient: the retry layer tries again)."""
        assert self.engine is not None
        session = PostgresSession(await self.engine.connect(), self._sessions)
        pid = _backend_pid(session)  # read now: a connection found dead is invalidated, its pid with it
        # At the bound the connection's socket is shut: a statement in flight fails at once. Cancelling
        # the task instead made psycopg send a cancel request and wait up to 5 s more for the stalled
        # server process to answer it (an ack's 2.5 s became 7.5 s); the timeout is only a backstop.
        fired: list[bool] = []

        def shut() -> None:
            fired.append(True)
            _shut_socket(session)

        cut = asyncio.get_running_loop().call_later(stall, shut)
        stalled = False
        try:
            async with asyncio.timeout(stall + STALL_BACKSTOP) as bound:
                await session.connection().begin()
                yield session
                await session.commit()
        except Exception:
            if not (fired or bound.expired()):
                raise  # a fault, or a timeout of the step's own
            stalled = True
            log.warning(
                "a database transaction did not finish within %gs: its connection is dropped and it is tried again", stall
            )
            raise TransactionStalled(f"the database did not finish a transaction within {stall:g}s") from None
        finally:
            if stalled:
                cut.cancel()
                self._end_later(pid)
                await session.drop()
                # Its neighbours in the pool may sit on the same stalled server: start afresh.
                with contextlib.suppress(Exception):
                    await self.engine.dispose()
            else:
                # Once committed, a failure to hand the connection back loses only the connection (the
                # pool replaces it); it must not fail a step that is done. After a failed step this is a
                # ROLLBACK, a round trip: `cut` still bounds it (the socket is shut, the pool drops it).
                with contextlib.suppress(Exception):
                    await session.close()
                cut.cancel()

    def _end_later(self, pid: int | None) -> None:
        """End a stalled connection's server process from a fresh connection, in the background (an
        ack must not wait for it), bounded and best effort (`_END_STALLED`)."""
        if pid is not None:
            task = asyncio.get_running_loop().create_task(self._end(pid), name="db-end-stalled")
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    async def _end(self, pid: int) -> None:
        assert self.engine is not None
        try:
            async with asyncio.timeout(END_SECONDS), self.engine.connect() as conn:
                ended = (await conn.execute(_END_STALLED, {"pid": pid})).scalar()
                await conn.commit()
        except Exception as exc:  # noqa: BLE001 - best effort: the server ends it itself (idle_in_transaction_session_timeout)
            log.warning("the server process %d of a stalled connection could not be ended: %s", pid, type(exc).__name__)
            return
        if ended:
            log.warning("the server process %d of a stalled connection was ended", pid)

    def _raised(self, info: dict[Any, Any]) -> list[tuple[str, Any]]:
        """The after-commit keys a committed session set, with their values (taken out of `info`)."""
        raised = [(flag, info.pop(flag, None)) for flag in self._after_commit]
        return [(flag, value) for flag, value in raised if value]

    @asynccontextmanager
    async def _committing(self, session: InlineSession) -> AsyncIterator[None]:
        """Commit the transaction `_begin_sqlite` opened, or roll it back on any exception. The
        commit (SQLite's fsync: milliseconds) runs on the one committer thread, so the event loop
        goes on meanwhile; the write lock stays held until it is done, even if the caller is
        cancelled (the connection is never closed under a running commit)."""
        try:
            yield
        except BaseException:
            session.rollback()
            raise
        commit = asyncio.get_running_loop().run_in_executor(self._committer, session.commit)
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(commit), COMMIT_WAIT)
            raise

    async def _begin_sqlite(self, deadline: float, *, urgent: bool) -> sa.Connection:
        """A connection in a `BEGIN IMMEDIATE` transaction, without a busy wait: while another
        connection holds the lock, try again after a short async sleep (other coroutines run
        meanwhile) until `deadline`. Urgent work polls at the shortest pause and holds the turnstile
        while it waits; background work begins only while nobody holds it (`storage.turnstile`)."""
        loop = asyncio.get_running_loop()
        pause, notice = LOCK_POLL_FIRST, loop.time() + LOCK_WAIT_NOTICE
        try:
            while True:
                connection = self._try_begin() if urgent or self._turnstile.free() else None
                if connection is not None:
                    return connection
                if urgent:
                    self._turnstile.hold()  # again at each poll: another front or a passing worker may have had it
                    if self._on_urgent_wait is not None and loop.time() >= notice:
                        notice = math.inf
                        self._on_urgent_wait()
                if loop.time() + pause > deadline:
                    raise LockBusy("the database is busy")
                await asyncio.sleep(pause)
                if not urgent:
                    pause = min(LOCK_POLL_MAX, pause * 2)
        finally:
            if urgent:
                self._turnstile.let_go()

    async def _turnstile_passed(self, deadline: float) -> None:
        """Background work waits here, before it queues for the lock, while a writer that must not
        wait holds the turnstile (so this process's own acks are not queued behind it either)."""
        loop = asyncio.get_running_loop()
        pause = LOCK_POLL_FIRST
        while not self._turnstile.free():
            if loop.time() + pause > deadline:
                raise LockBusy("the database is busy")
            await asyncio.sleep(pause)
            pause = min(LOCK_POLL_MAX, pause * 2)

    def _try_begin(self) -> sa.Connection | None:
        """A connection in a `BEGIN IMMEDIATE` transaction, or None while another connection holds the lock."""
        connection, self._writer = self._writer or self.sync_engine.connect(), None
        try:
            connection.begin()  # emits BEGIN IMMEDIATE (the "begin" listener)
            return connection
        except BaseException as exc:
            connection.close()
            if isinstance(exc, sa.exc.OperationalError) and _locked(exc):
                return None
            raise

    @staticmethod
    def _limit(urgent: bool, deadline: float | None) -> float:
        """Seconds a step's attempts may take in all."""
        return deadline if deadline is not None else URGENT_BUDGET if urgent else RETRY_DEADLINE

    def attempts(self, *, urgent: bool = False, deadline: float | None = None) -> AsyncRetrying:
        """The retry policy for one database step (tenacity): transient faults only, bounded backoff."""
        limit = self._limit(urgent, deadline)
        return AsyncRetrying(
            retry=retry_if_exception(is_transient),
            # Full jitter (a random pause up to the exponential step): replicas retrying the same fault
            # spread out; an ack's pauses stay short, and no attempt starts after the deadline.
            wait=wait_random_exponential(multiplier=0.05, max=0.2 if urgent else 2.0),
            stop=stop_before_delay(limit),
            before_sleep=self._retrying,
            reraise=True,
        )

    async def run(
        self,
        step: Callable[[DbSession], Awaitable[T]],
        *,
        urgent: bool = False,
        read: bool = False,
        deadline: float | None = None,
        stall: float | None = None,
    ) -> T:
        """`step(session)` in one transaction, attempted again from the start on transient faults.

        `step` must be safe to run more than once: everything it does happens inside the
        transaction, which a failed attempt rolled back. An urgent step's attempts share
        `URGENT_BUDGET`: each waits for the lock only as long as the budget has left.

        The first attempt runs outside tenacity (`storage.retrying`); the policy's deadline counts
        from the step's start. `stall` (PostgreSQL): each attempt's bound, if shorter than this handle's."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        budget_ends = started + URGENT_BUDGET
        return await first_then_retry(
            lambda: self._attempt(step, urgent=urgent, read=read, budget_ends=budget_ends, stall=stall),
            lambda: self.attempts(urgent=urgent, deadline=self._limit(urgent, deadline) - (loop.time() - started)),
            is_transient,
        )

    async def _attempt(
        self, step: Callable[[DbSession], Awaitable[T]], *, urgent: bool, read: bool, budget_ends: float, stall: float | None
    ) -> T:
        lock_wait = max(0.0, budget_ends - asyncio.get_running_loop().time())
        async with self.transaction(urgent=urgent, read=read, lock_wait=lock_wait, stall=stall) as session:
            return await step(session)

    async def dispose(self) -> None:
        if self.engine is not None:
            for task in list(self._ending):
                task.cancel()
            await asyncio.gather(*self._ending, return_exceptions=True)
            await self.engine.dispose()
        else:
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.close()
            self.sync_engine.dispose()
            self._committer.shutdown(wait=False)
            self._turnstile.close()
