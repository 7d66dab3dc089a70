"""Hot statements, prepared once and run on the transaction's own driver connection.

A turn runs about twenty statements. Through `Session.execute` each one pays for SQLAlchemy's
execution layers (a cache key, an execution context, result metadata, events) and, on
PostgreSQL, for the greenlet bridge to psycopg's async API: measured here 60–90 µs a statement on
SQLite (the statement itself: 4–5 µs) and 0.5–0.8 ms of CPU on PostgreSQL (psycopg alone:
0.2 ms). `Prepared` keeps SQLAlchemy for what it does well (the SQL of each dialect, the type
processing of every bound value and result column, the error classes) and works it out once:
the statement is compiled once per dialect (an INSERT once per set of columns given) and each
execution hands the SQL and the processed values straight to the DB-API connection of the
caller's transaction. Nothing else changes: the transaction, its commit and its retries stay
`Database`'s.

A driver error is raised as SQLAlchemy's own exception class (`IntegrityError`, `OperationalError`,
`DBAPIError.connection_invalidated` for a lost connection, whose pooled connection is then
discarded), so `storage.engine.is_transient` and every `except` keep working. SQLAlchemy's
`before_cursor_execute` and `after_cursor_execute` events still fire (only when someone listens),
with a stand-in for the execution context.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from storage.sessions import DbSession, InlineSession, PostgresSession

__all__ = ["Prepared", "Rows", "pipelined"]

_DRIVER = "storage.prepared.driver"  # where a transaction's session keeps its driver connection


class Rows:
    """A prepared statement's result: the rows it returned (all fetched) and the rows it changed."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def all(self) -> list[Any]:
        return self._rows

    def first(self) -> Any | None:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise sa.exc.NoResultFound("no row") if not self._rows else sa.exc.MultipleResultsFound("several rows")
        return self._rows[0]

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalars(self) -> list[Any]:
        return [row[0] for row in self._rows]

    def scalar_one_or_none(self) -> Any | None:
        if len(self._rows) > 1:
            raise sa.exc.MultipleResultsFound("several rows")
        return self._rows[0][0] if self._rows else None


class _EventContext:
    """Stands in for SQLAlchemy's execution context in the cursor events (listeners such as
    tracing may keep their own attributes on it between `before_` and `after_cursor_execute`)."""


@dataclass(frozen=True)
class _Driver:
    """The caller's transaction as the driver sees it, and the SQLAlchemy connection whose cursor
    events it fires (for listeners: tracing, statement counts in tests and benchmarks)."""

    dialect: Dialect
    connection: Any  # sqlite3.Connection or psycopg.AsyncConnection
    # psycopg: one cursor for the whole transaction (a new one per statement costs ~15% of its time).
    # sqlite3: None, a cursor per statement, closed at once on this thread: a cursor left to the
    # garbage collector resets its last statement wherever the collector runs (the committer
    # thread, say), and that statement is shared through the connection's statement cache with
    # whichever cursor runs the same SQL next ("bad parameter or other API misuse").
    cursor: Any
    is_async: bool
    events: sa.Connection
    invalidate: Callable[[BaseException], Any]

    async def execute(self, sql: str, args: Any, *, many: bool) -> tuple[list[tuple[Any, ...]], int]:
        """Run `sql` once (or, `many`, once per parameter set): the rows it returned and the rows it changed."""
        events = self.events.dispatch
        context = _EventContext() if events.before_cursor_execute or events.after_cursor_execute else None
        cursor = self.cursor if self.cursor is not None else self.connection.cursor()
        try:
            if context is not None:
                events.before_cursor_execute(self.events, cursor, sql, args, context, many)
            run = cursor.executemany if many else cursor.execute
            if self.is_async:
                await run(sql, args)
                fetched = await cursor.fetchall() if cursor.description else []
            else:
                run(sql, args)
                fetched = cursor.fetchall() if cursor.description else []
            if context is not None:
                events.after_cursor_execute(self.events, cursor, sql, args, context, many)
            return fetched, cursor.rowcount
        except self.dialect.loaded_dbapi.Error as exc:
            raise await self._wrapped(exc, sql) from exc
        finally:
            if cursor is not self.cursor:
                cursor.close()

    async def _wrapped(self, exc: BaseException, sql: str) -> sa.exc.DBAPIError:
        """SQLAlchemy's exception for a driver error; a lost connection is taken out of the pool."""
        lost = self.dialect.is_disconnect(cast(Any, exc), self.connection, None)
        if lost:
            invalidated = self.invalidate(exc)
            if invalidated is not None:
                await invalidated
        error = sa.exc.DBAPIError.instance(  # without the values: they may hold what the redactor would hide
            sql, None, cast(Exception, exc), self.dialect.loaded_dbapi.Error, connection_invalidated=lost, dialect=self.dialect
        )
        return cast(sa.exc.DBAPIError, error)


@dataclass(frozen=True)
class _Expansion:
    """A statement's IN lists expanded for one set of list lengths: the SQL, the order of its
    parameters, their processors, and the names each list's items take (`ExpandedState`'s)."""

    sql: str
    names: Sequence[str] | None
    processors: Mapping[str, Callable[[Any], Any]]
    items: Mapping[str, Sequence[str]]


_EXPANSIONS_KEPT = 64  # list lengths remembered per statement (a batch's ids can take many lengths)


@dataclass(frozen=True)
class _Plan:
    """One statement compiled for one dialect (and, for an INSERT, one set of columns)."""

    compiled: SQLCompiler
    processors: Mapping[str, Callable[[Any], Any]]  # bound value processors, by bound name
    row: Callable[..., Any] | None  # builds a named row from a driver tuple (None: rows as the driver gives them)
    result_processors: tuple[Callable[[Any], Any] | None, ...]
    # IN lists whose SQL depends only on their lengths; SQLAlchemy re-renders it on every execution
    # (a regular-expression pass over the SQL: most of a small statement's cost), so it is kept by length.
    lists: tuple[str, ...] = ()
    expansions: dict[tuple[int, ...], _Expansion] = field(default_factory=dict)

    def bind(self, params: Mapping[str, Any]) -> tuple[str, Any]:
        """The SQL (with expanded IN lists) and the driver's parameters, each processed by its type."""
        compiled, processors = self.compiled, self.processors
        values: Mapping[str, Any]
        if self.lists:
            values = given = compiled.construct_params(params)
            expansion = self._expansion(params, tuple(len(given[name]) for name in self.lists))
            for name, items in expansion.items.items():
                given.update(zip(items, given.pop(name), strict=True))
            sql, names, processors = expansion.sql, expansion.names, expansion.processors
        elif compiled.post_compile_params or compiled.literal_execute_params:
            state = compiled.construct_expanded_state(params)
            sql, values, names = state.statement, state.parameters, state.positiontup
            processors = {**processors, **state.processors}
        else:  # the SQL as compiled: only the values to work out
            sql, values, names = compiled.string, compiled.construct_params(params), compiled.positiontup
        if names is not None:
            return sql, tuple(processors[n](values[n]) if n in processors else values[n] for n in names)
        return sql, {n: processors[n](v) if n in processors else v for n, v in values.items()}

    def _expansion(self, params: Mapping[str, Any], lengths: tuple[int, ...]) -> _Expansion:
        expansion = self.expansions.get(lengths)
        if expansion is None:
            state = self.compiled.construct_expanded_state(params)
            expansion = _Expansion(
                state.statement, state.positiontup, {**self.processors, **state.processors}, state.parameter_expansion
            )
            if len(self.expansions) < _EXPANSIONS_KEPT:
                self.expansions[lengths] = expansion
        return expansion

    def rows(self, fetched: Sequence[tuple[Any, ...]]) -> list[Any]:
        if self.row is None:  # a text statement: its columns are known only to the database
            return list(fetched)
        make, processors = self.row, self.result_processors
        if any(processors):
            return [make(*(p(v) if p else v for p, v in zip(processors, raw, strict=True))) for raw in fetched]
        return [make(*raw) for raw in fetched]


class Prepared:
    """A statement built once at import, run with bound parameters on the caller's transaction.

    `await STATEMENT.run(session, params)` for one execution (returns `Rows`); `run_many(session,
    rows)` for one `executemany` of an INSERT, UPDATE or DELETE (every row with the same keys).
    Refused at first use: a statement whose columns would need SQLAlchemy's Python-side defaults."""

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._plans: dict[tuple[str, tuple[str, ...] | None], _Plan] = {}

    async def run(self, session: DbSession, params: Mapping[str, Any] | None = None) -> Rows:
        driver = await _driver_of(session)
        values = params or {}
        plan = self._plan(driver.dialect, values)
        sql, args = plan.bind(values)
        fetched, count = await driver.execute(sql, args, many=False)
        return Rows(plan.rows(fetched) if fetched else [], count)

    async def run_many(self, session: DbSession, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        driver = await _driver_of(session)
        plan = self._plan(driver.dialect, rows[0])
        sql, first = plan.bind(rows[0])
        if len(rows) == 1:  # psycopg runs every `executemany` in a pipeline of its own: ~0.3 ms more for one row
            await driver.execute(sql, first, many=False)
            return
        await driver.execute(sql, [first, *(plan.bind(row)[1] for row in rows[1:])], many=True)

    def _plan(self, dialect: Dialect, params: Mapping[str, Any]) -> _Plan:
        # An INSERT without explicit values lists the columns it is given, as SQLAlchemy does.
        columns = tuple(sorted(params)) if isinstance(self.statement, sa.Insert) else None
        key = (dialect.name, columns)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._compile(dialect, columns)
        return plan

    def _compile(self, dialect: Dialect, columns: tuple[str, ...] | None) -> _Plan:
        # `for_executemany`: an INSERT returns only what it asks for (compiled for one row, PostgreSQL's
        # would also return the new key unasked, fetched and thrown away on every message and answer).
        if columns is None:
            compiled = cast(SQLCompiler, self.statement.compile(dialect=dialect))
        else:
            compiled = cast(SQLCompiler, self.statement.compile(dialect=dialect, column_keys=list(columns), for_executemany=True))
        if compiled.insert_prefetch or compiled.update_prefetch:
            raise TypeError(f"{self.statement}: columns with Python-side defaults need a value; give every column one")
        processors = {
            name: processor
            for name, bind in compiled.binds.items()
            if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }
        # A SELECT's columns, or what an INSERT, UPDATE or DELETE asked to return.
        if isinstance(self.statement, sa.Select):
            columns_out = list(self.statement.selected_columns)
        else:
            columns_out = list(compiled.effective_returning or ())
        lists = _plain_lists(compiled)
        if not columns_out:
            return _Plan(compiled, processors, None, (), lists)
        row = namedtuple("Row", [c.key for c in columns_out])  # type: ignore[misc]  # names known only here
        results = tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns_out)
        return _Plan(compiled, processors, row, results, lists)


def _plain_lists(compiled: SQLCompiler) -> tuple[str, ...]:
    """The names of the statement's IN lists when its expanded SQL depends on their lengths alone:
    plain lists (not tuples, not values rendered into the SQL) under names that need no escaping."""
    expanding = compiled.post_compile_params
    if not expanding or compiled.literal_execute_params or compiled.escaped_bind_names:
        return ()
    if any(bind.literal_execute or bind.type._is_tuple_type for bind in expanding):
        return ()
    return tuple(compiled.bind_names[bind] for bind in expanding)


@asynccontextmanager
async def pipelined(session: DbSession) -> AsyncIterator[None]:
    """The block's prepared statements sent together on PostgreSQL (psycopg's pipeline mode): one
    round trip for all of them instead of one each, for writes whose results the block does not read.
    An ack's recording is three INSERTs, and each round trip waits for a server busy with the
    workers' queries (measured, five alternated pairs of `bench_serve --db postgres`: the median ack
    at 20 concurrent senders 20–29 ms against 25–60 ms without, lower in four pairs; p99 in the noise).
    A statement that fails raises when the block ends, as SQLAlchemy's exception class (the one
    `Prepared` raises), and its transaction is then rolled back by its caller as usual. On SQLite
    the statements run as they come: they cost no round trip."""
    if isinstance(session, InlineSession):
        yield
        return
    driver = await _driver_of(session)
    try:
        async with driver.connection.pipeline():
            yield
    except driver.dialect.loaded_dbapi.Error as exc:
        raise await driver._wrapped(exc, "(a pipeline of statements)") from exc


async def _driver_of(session: DbSession) -> _Driver:
    """The DB-API connection of `session`'s transaction (its first statement begins it)."""
    driver = session.info.get(_DRIVER)
    if driver is not None:
        return cast(_Driver, driver)
    if isinstance(session, InlineSession):
        sync = session.connection()
        dbapi: Any = sync.connection.driver_connection
        driver = _Driver(sync.dialect, dbapi, None, False, sync, sync.invalidate)
    else:
        connection = cast(PostgresSession, session).connection()
        raw = await connection.get_raw_connection()
        events = connection.sync_connection
        assert events is not None  # a started transaction's connection
        dbapi = cast(Any, raw.driver_connection)
        driver = _Driver(connection.dialect, dbapi, dbapi.cursor(), True, events, connection.invalidate)
    session.info[_DRIVER] = driver
    return driver
