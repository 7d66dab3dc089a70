"""The audit log: append-only rows, each chained to the previous one by SHA-256.

`AuditLog.record` stages a row inside the caller's transaction, so the row exists exactly when
the state change it describes does, without taking any lock on the hot path. `AuditLog.chain`
(run right after such a commit, by the sweeper, and before the audit CLI reads) moves staged rows
into `audit_event`, one chainer at a time (PostgreSQL advisory lock; SQLite's write lock), so
concurrent writers, threads, processes or replicas, never fork the chain. `verify_chain` walks
the whole chain and names the first bad row; anchors let a later truncation or rewrite be detected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from storage.engine import Database
from storage.models import AuditEvent, AuditStaged, utcnow
from storage.redact import Redactor

GENESIS_HASH = "0" * 64
_ADVISORY_LOCK_KEY = 7_240_001  # any constant shared by every replica


def canonical_json(value: Any) -> str:
    """Sorted keys, compact separators, UTF-8 kept: the exact bytes the hash covers."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


# What a row records, as staged; the chain adds `seq`, `prev_hash` and `hash`.
RECORDED = ("at", "kind", "run_id", "approval_id", "platform", "actor", "tool", "status", "data")
HASHED = ("seq", *RECORDED, "prev_hash")


def row_content(row: Any) -> dict[str, Any]:
    """The hashed fields of a row (everything but `hash` itself), timestamps as ISO text."""
    get = row.get if isinstance(row, dict) else (lambda k: getattr(row, k))
    content = {k: get(k) for k in HASHED}
    if isinstance(content["at"], datetime):
        content["at"] = content["at"].isoformat()
    return content


def compute_hash(row: AuditEvent | dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(row_content(row)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One audit row to append: its kind, indexed fields (run_id, tool, status...) and free data."""

    kind: str
    fields: dict[str, Any]
    data: dict[str, Any]


def entry(
    kind: str,
    *,
    run_id: str | None = None,
    approval_id: str | None = None,
    platform: str | None = None,
    actor: str | None = None,
    tool: str | None = None,
    status: str | None = None,
    **data: Any,
) -> Entry:
    return Entry(
        kind,
        {"run_id": run_id, "approval_id": approval_id, "platform": platform, "actor": actor, "tool": tool, "status": status},
        data,
    )


class AuditLog:
    """Writes audit rows: staged inside the caller's transaction, then chained by `chain`."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor

    async def record(self, session: Any, kind: str, **fields_and_data: Any) -> None:
        """Stage one row (fields as for `entry`). Secrets are redacted before it is stored and hashed."""
        await self.record_many(session, [entry(kind, **fields_and_data)])

    async def record_many(self, session: Any, entries: list[Entry]) -> None:
        """Stage rows in order, atomically with the caller's transaction. No lock is taken here."""
        if not entries:
            return
        now = utcnow()
        rows = [
            {"at": now, "kind": e.kind, **e.fields, "data": json.loads(canonical_json(self.redactor.redact(e.data)))}
            for e in entries
        ]
        await session.execute(sa.insert(AuditStaged), rows)
        session.info["audit_staged"] = True

    async def chain(self, db: Database, batch: int = 500) -> int:
        """Move staged rows into the hash chain, one writer at a time. Returns how many were chained."""
        total = 0
        while True:
            async with db.transaction() as session:
                if session.bind.dialect.name == "postgresql":
                    # One chainer per schema at a time (replicas of other deployments on the server don't wait).
                    await session.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:k, hashtext(current_schema()))"), {"k": _ADVISORY_LOCK_KEY}
                    )
                staged = (await session.execute(sa.select(*AuditStaged.__table__.c).order_by(AuditStaged.id).limit(batch))).all()
                if not staged:
                    return total
                last = (
                    await session.execute(sa.select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1))
                ).first()
                seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
                rows = []
                for row in staged:
                    content = {"seq": seq, **{k: getattr(row, k) for k in RECORDED}, "prev_hash": prev}
                    content["hash"] = compute_hash(content)
                    rows.append(content)
                    seq, prev = seq + 1, content["hash"]
                await session.execute(sa.insert(AuditEvent), rows)
                await session.execute(sa.delete(AuditStaged).where(AuditStaged.id.in_([r.id for r in staged])))
                total += len(rows)
                if len(staged) < batch:
                    return total


@dataclass(frozen=True)
class ChainProblem:
    """The first row at which the chain stops verifying, and why."""

    seq: int
    reason: str


def verify_chain(rows: Iterable[AuditEvent], *, start_hash: str = GENESIS_HASH, start_seq: int = 1) -> ChainProblem | None:
    """Check every link of rows ordered by seq. Returns the first problem, or None when intact."""
    expected_prev, expected_seq = start_hash, start_seq
    for row in rows:
        if row.seq != expected_seq:
            return ChainProblem(
                expected_seq if row.seq > expected_seq else row.seq, f"expected row {expected_seq}, found row {row.seq}"
            )
        if row.prev_hash != expected_prev:
            return ChainProblem(row.seq, "prev_hash does not match the previous row")
        if compute_hash(row) != row.hash:
            return ChainProblem(row.seq, "content does not match its hash")
        expected_prev, expected_seq = row.hash, row.seq + 1
    return None


def iter_rows(session: sa.orm.Session, batch: int = 2000) -> Iterator[AuditEvent]:
    """All audit rows in order, read in batches (sync session, for the CLI)."""
    last = 0
    while True:
        chunk = (
            session.execute(sa.select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch))
            .scalars()
            .all()
        )
        if not chunk:
            return
        yield from chunk
        last = chunk[-1].seq
