"""A transaction's session, as the bot's code sees it (`DbSession`), over either database.

Most of a turn's transactions run only prepared statements (`storage.prepared`); for them an ORM
`Session`'s begin, connection and commit machinery cost more than their statements. So a
transaction here is a connection's, and an ORM session joins it only when code asks for the ORM
(`get`, `add`, `execute`, `flush`, `refresh`): `InlineSession` over a synchronous SQLite
connection run inline, `PostgresSession` over an async PostgreSQL connection. `storage.engine`
opens, commits and closes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, TypeVarTuple, cast, overload

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable
from sqlalchemy.sql.selectable import TypedReturnsRows

__all__ = ["DbSession", "InlineSession", "PostgresSession", "rowcount"]

M = TypeVar("M")
Ts = TypeVarTuple("Ts")
C = TypeVar("C", sa.Connection, AsyncConnection)
S = TypeVar("S", Session, AsyncSession)

# The joined ORM session's commit and rollback are the transaction's own.
_JOIN = "control_fully"


class DbSession(Protocol):
    """A transaction's session, whichever the database: a `PostgresSession` or an `InlineSession`
    (SQLite). Code annotates sessions with this, so the type checker refuses what only one of the
    two offers."""

    @property
    def bind(self) -> Any: ...

    @property
    def info(self) -> dict[Any, Any]: ...

    def add(self, instance: object) -> None: ...

    async def get(self, entity: type[M], ident: Any) -> M | None: ...

    @overload
    async def execute(self, statement: TypedReturnsRows[*Ts], params: Any = None) -> Result[*Ts]: ...
    @overload
    async def execute(self, statement: Executable, params: Any = None) -> Result[*tuple[Any, ...]]: ...

    async def flush(self) -> None: ...

    async def refresh(self, instance: object) -> None: ...


def rowcount(result: Result[*tuple[Any, ...]]) -> int:
    """The rows an UPDATE or DELETE matched. Its result is a `CursorResult` (which has `rowcount`);
    `Session.execute` is declared to return the `Result` base class."""
    return cast("CursorResult[*tuple[Any, ...]]", result).rowcount


class _Joined(Generic[C, S]):
    """What both sessions share: the transaction's connection, the ORM session that joins it on
    first use, and `info` (what the transaction leaves for after its commit)."""

    def __init__(self, connection: C, sessions: Callable[..., S]) -> None:
        self._connection: C = connection
        self._sessions: Callable[..., S] = sessions
        self._orm: S | None = None
        self.info: dict[Any, Any] = {}

    @property
    def _session(self) -> S:
        if self._orm is None:
            self._orm = self._sessions(bind=self._connection, join_transaction_mode=_JOIN)
        return self._orm

    @property
    def bind(self) -> Any:
        return self._connection.engine

    def add(self, instance: object) -> None:
        self._session.add(instance)

    def connection(self) -> C:
        """The transaction's connection (`storage.prepared` runs hot statements on its driver)."""
        return self._connection


class InlineSession(_Joined[sa.Connection, Session]):
    """The part of `AsyncSession` the bot uses (`DbSession`), over one SQLite `Connection`'s
    transaction, run inline; a `Session` joins it when the ORM is first asked for."""

    async def get(self, entity: type[M], ident: Any) -> M | None:
        return self._session.get(entity, ident)

    def commit(self) -> None:
        """Flush what the ORM holds (if it was used) and commit."""
        if self._orm is not None:
            self._orm.commit()
        else:
            self._connection.commit()

    def rollback(self) -> None:
        if self._orm is not None:
            self._orm.rollback()
        else:
            self._connection.rollback()

    def close(self) -> None:
        """Close the ORM session (if any) and give the connection back (rolled back if still open)."""
        try:
            if self._orm is not None:
                self._orm.close()
        finally:
            self._connection.close()

    def detach(self) -> sa.Connection:
        """After the commit: close the ORM session (if any) and return the connection, still open,
        for the next transaction (closed instead if the ORM session fails to close)."""
        try:
            if self._orm is not None:
                self._orm.close()
        except BaseException:
            self._connection.close()
            raise
        return self._connection

    @overload
    async def execute(self, statement: TypedReturnsRows[*Ts], params: Any = None) -> Result[*Ts]: ...
    @overload
    async def execute(self, statement: Executable, params: Any = None) -> Result[*tuple[Any, ...]]: ...

    async def execute(self, statement: Executable, params: Any = None) -> Result[*tuple[Any, ...]]:
        return self._session.execute(statement, params)

    async def flush(self) -> None:
        self._session.flush()

    async def refresh(self, instance: object) -> None:
        self._session.refresh(instance)


class PostgresSession(_Joined[AsyncConnection, AsyncSession]):
    """The part of `AsyncSession` the bot uses (`DbSession`), over one `AsyncConnection`'s
    transaction; an `AsyncSession` joins it when the ORM is first asked for."""

    async def get(self, entity: type[M], ident: Any) -> M | None:
        return await self._session.get(entity, ident)

    @overload
    async def execute(self, statement: TypedReturnsRows[*Ts], params: Any = None) -> Result[*Ts]: ...
    @overload
    async def execute(self, statement: Executable, params: Any = None) -> Result[*tuple[Any, ...]]: ...

    async def execute(self, statement: Executable, params: Any = None) -> Result[*tuple[Any, ...]]:
        return await self._session.execute(statement, params)

    async def flush(self) -> None:
        await self._session.flush()

    async def refresh(self, instance: object) -> None:
        await self._session.refresh(instance)

    async def commit(self) -> None:
        """Flush what the ORM holds (if it was used) and commit."""
        if self._orm is not None:
            await self._orm.commit()
        else:
            await self._connection.commit()

    async def close(self) -> None:
        """Close the ORM session (if any) and give the connection back (rolled back if still open)."""
        try:
            if self._orm is not None:
                await self._orm.close()
        finally:
            await self._connection.close()

    async def drop(self) -> None:
        """Give the connection up without a word to the server (its transaction stalled): it is closed
        and never pooled again; nothing is rolled back by us (the server does, once it runs again)."""
        with contextlib.suppress(Exception):
            await self._connection.invalidate()
        with contextlib.suppress(Exception):
            if self._orm is not None:
                await self._orm.close()
        with contextlib.suppress(Exception):
            await self._connection.close()
