"""Read-only access to the audit log: the engine, the filters and the paginated queries.

Every page is one read transaction (a consistent snapshot). On SQLite the transaction is a plain
deferred `BEGIN` on a `query_only` connection, so it only ever takes a shared read lock and never
waits for (or blocks) the bot's writers; on PostgreSQL it is `READ ONLY`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlmodel import col

from bot.cli_audit import parse_since
from bot.core.errors import ChatopsError
from storage.engine import SQLITE_BUSY_TIMEOUT_MS, normalise_url
from storage.models import AuditEvent, AuditStaged

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
EXPORT_BATCH = 1000
MAX_SEQ = 2**63 - 1  # the largest row number a database column holds


def make_read_engine(database_url: str) -> sa.Engine:
    """An engine whose transactions can only read (and on SQLite never take the write lock)."""
    urls = normalise_url(database_url)
    if not urls.is_sqlite:
        engine = sa.create_engine(urls.sync_url, pool_pre_ping=True)
        sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("SET TRANSACTION READ ONLY"))
        return engine
    path = urls.sync_url.database
    if path and path != ":memory:" and not Path(path).is_file():
        raise ChatopsError(f"DATABASE_URL: there is no database at {path} (start the bot or run `chatops db upgrade` first)")
    engine = sa.create_engine(urls.sync_url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @sa.event.listens_for(engine, "connect")
    def _read_only(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves: deferred, i.e. a read snapshot
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA query_only=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN DEFERRED"))
    return engine


class BadFilter(ChatopsError):
    """A filter value the page cannot use (shown to the user, HTTP 400)."""


@dataclass(frozen=True)
class Filters:
    """What the user asked to see. Empty strings mean "any"."""

    q: str = ""
    actor: str = ""
    tool: str = ""
    status: str = ""
    kind: str = ""
    since: str = ""
    until: str = ""

    @classmethod
    def from_query(cls, query: Any) -> Filters:
        return cls(**{f.name: str(query.get(f.name, "")).strip()[:200] for f in fields(cls)})

    def as_params(self) -> dict[str, str]:
        """The non-empty filters, for links that keep them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    @property
    def active(self) -> bool:
        return bool(self.as_params())

    def where(self) -> list[sa.ColumnElement[bool]]:
        """The SQL conditions (LIKE wildcards in user text are matched literally)."""
        conditions: list[sa.ColumnElement[bool]] = []
        if self.q:
            searched = (
                col(AuditEvent.run_id),
                col(AuditEvent.approval_id),
                col(AuditEvent.actor),
                col(AuditEvent.tool),
                col(AuditEvent.kind),
            )
            # `data` is stored as JSON text with non-ASCII escaped (\u5f20): search that spelling too.
            in_data = [
                sa.cast(AuditEvent.data, sa.Text).icontains(v, autoescape=True) for v in {self.q, json.dumps(self.q)[1:-1]}
            ]
            conditions.append(sa.or_(*(c.icontains(self.q, autoescape=True) for c in searched), *in_data))
        if self.actor:
            conditions.append(col(AuditEvent.actor).icontains(self.actor, autoescape=True))
        for column, value in (
            (col(AuditEvent.tool), self.tool),
            (col(AuditEvent.status), self.status),
            (col(AuditEvent.kind), self.kind),
        ):
            if value:
                conditions.append(column == value)
        if self.since:
            conditions.append(col(AuditEvent.at) >= _moment("from", self.since))
        if self.until:
            conditions.append(col(AuditEvent.at) < _moment("to", self.until))
        return conditions


def _moment(label: str, value: str) -> datetime:
    try:
        return parse_since(value)
    except ChatopsError:
        raise BadFilter(
            f"{label}: {value!r} is neither a duration like 2h/3d nor a date like 2026-11-20 or 2026-11-20T14:30"
        ) from None


@dataclass(frozen=True)
class Page:
    """One page of rows, newest first, with the keys of its neighbours."""

    rows: list[AuditEvent]
    total: int
    newer_after: int | None  # pass as `after` to see the page above this one
    older_before: int | None  # pass as `before` to see the page below this one


def read_page(session: Session, filters: Filters, *, before: int | None, after: int | None, size: int) -> Page:
    """The rows matching `filters`, `size` (1 to MAX_PAGE_SIZE) at a time, keyset-paginated on seq."""
    limit = max(1, min(MAX_PAGE_SIZE, size))
    where = filters.where()
    query = sa.select(AuditEvent).where(*where)
    if after is not None:
        chunk = (
            session.execute(query.where(col(AuditEvent.seq) > after).order_by(col(AuditEvent.seq)).limit(limit + 1))
            .scalars()
            .all()
        )
        has_newer, rows = len(chunk) > limit, list(reversed(chunk[:limit]))
        has_older = bool(rows) and _exists(session, where, col(AuditEvent.seq) < rows[-1].seq)
    else:
        if before is not None:
            query = query.where(col(AuditEvent.seq) < before)
        chunk = session.execute(query.order_by(col(AuditEvent.seq).desc()).limit(limit + 1)).scalars().all()
        has_older, rows = len(chunk) > limit, list(chunk[:limit])
        has_newer = before is not None and bool(rows) and _exists(session, where, col(AuditEvent.seq) > rows[0].seq)
    total = session.execute(sa.select(sa.func.count()).select_from(AuditEvent).where(*where)).scalar_one()
    return Page(
        rows,
        total,
        newer_after=rows[0].seq if rows and has_newer else None,
        older_before=rows[-1].seq if rows and has_older else None,
    )


def _exists(session: Session, where: list[sa.ColumnElement[bool]], extra: sa.ColumnElement[bool]) -> bool:
    return session.execute(sa.select(col(AuditEvent.seq)).where(*where, extra).limit(1)).first() is not None


def choices(session: Session) -> dict[str, list[str]]:
    """The values the tool, status and kind filters can take (what the log contains)."""
    found = {}
    for name in ("tool", "status", "kind"):
        column = getattr(AuditEvent, name)
        found[name] = sorted(session.execute(sa.select(column).where(column.is_not(None)).distinct()).scalars().all())
    return found


def head(session: Session) -> int:
    """The newest chained seq (0 for an empty log)."""
    return session.execute(sa.select(sa.func.max(AuditEvent.seq))).scalar() or 0


def prefix_state(session: Session, upto: int) -> tuple[int, str | None]:
    """How many chained rows have seq <= `upto`, and row `upto`'s hash (None when it is gone)."""
    count = session.execute(sa.select(sa.func.count()).where(col(AuditEvent.seq) <= upto)).scalar_one()
    digest = session.execute(sa.select(col(AuditEvent.hash)).where(col(AuditEvent.seq) == upto)).scalar()
    return count, digest


def staged_count(session: Session) -> int:
    """Rows the bot has recorded but not chained yet (they appear once chained)."""
    return session.execute(sa.select(sa.func.count()).select_from(AuditStaged)).scalar_one()


def iter_filtered(session: Session, filters: Filters) -> Iterator[list[AuditEvent]]:
    """Every row matching `filters`, oldest first, in batches (for downloads). Each batch is read in
    a transaction of its own, ended before the batch goes out: a slow client never keeps a read
    transaction open (on PostgreSQL it held back vacuum for as long as the client liked). Rows are
    only ever appended, so the batches still make one ordered export."""
    last = 0
    where = filters.where()
    while True:
        query = sa.select(AuditEvent).where(*where, col(AuditEvent.seq) > last).order_by(col(AuditEvent.seq)).limit(EXPORT_BATCH)
        batch = list(session.execute(query).scalars().all())
        session.expunge_all()  # the rows keep what was read...
        session.rollback()  # ...and the snapshot is let go (a read: nothing to keep)
        if not batch:
            return
        yield batch
        last = batch[-1].seq
