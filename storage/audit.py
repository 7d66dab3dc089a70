"""The audit log: append-only rows, each chained to the previous one by an HMAC-SHA256.

`AuditLog.record` stages a row inside the caller's transaction, so the row exists exactly when
the state change it describes does, without taking any lock on the hot path; the staged row is
sealed with an HMAC under the current audit key. `AuditLog.chain` (run right after such a commit,
by the sweeper, and before the audit CLI reads) moves staged rows into `audit_event`, one chainer
at a time (PostgreSQL advisory lock; SQLite's write lock), so concurrent writers never fork the
chain. A staged row whose seal does not verify is not chained as if nothing happened: an
`audit_staged_tampered` row records what was found instead.

Each chained row's `hash` is HMAC-SHA256(key, canonical JSON of its fields, `prev_hash` and
`key_id`) under a key kept outside the database (`storage/audit_keys.py`), so a row cannot be
forged, edited or appended by someone who can only write to the database. Rotation: an
`audit_key_rotated` row, sealed under the old key, names the next key. Databases chained before
the key existed keep their unkeyed rows (SHA-256, `key_id` NULL) as a legacy prefix, closed by an
`audit_keyed` row sealed under the key. `verify_chain` walks the whole chain and names the first
bad row; anchors (`storage/audit_anchor.py`) let a later truncation or rewrite be detected.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlmodel import col

from storage.audit_keys import AuditKeyError, AuditKeys, default_key_file, key_id, load_keys
from storage.engine import Database
from storage.models import AuditEvent, AuditStaged, table_of, utcnow
from storage.prepared import Prepared
from storage.redact import Redactor
from storage.sessions import DbSession

__all__ = ["AuditKeyError", "AuditKeys", "AuditLog", "ChainProblem", "verify_chain"]
# Prepared once (`storage.prepared`): every step of every run stages rows, and the chainer moves them after each commit.
_STAGED_TABLE, _EVENTS = table_of(AuditStaged), table_of(AuditEvent)
_STAGE = Prepared(sa.insert(_STAGED_TABLE))
_OLDEST_STAGED = Prepared(sa.select(_STAGED_TABLE).order_by(_STAGED_TABLE.c.id).limit(sa.bindparam("b_limit")))
_CHAIN = Prepared(sa.insert(_EVENTS))
_UNSTAGE = Prepared(sa.delete(_STAGED_TABLE).where(_STAGED_TABLE.c.id.in_(sa.bindparam("b_ids", expanding=True))))
_HEAD = Prepared(
    sa.select(_EVENTS.c.seq, _EVENTS.c.hash, _EVENTS.c.key_id, _EVENTS.c.kind, _EVENTS.c.data)
    .order_by(_EVENTS.c.seq.desc())
    .limit(1)
)
# One chainer per schema at a time (replicas of other deployments on the server don't wait).
_CHAINER_LOCK = Prepared(sa.text("SELECT pg_advisory_xact_lock(:k, hashtext(current_schema()))"))

log = logging.getLogger("chatops.audit")

GENESIS_HASH = "0" * 64
KEYED_KIND = "audit_keyed"
ROTATED_KIND = "audit_key_rotated"
TAMPERED_KIND = "audit_staged_tampered"
_ADVISORY_LOCK_KEY = 7_240_001  # any constant shared by every replica


# `json.dumps` with these options builds this encoder on every call (a fifth of a small row's cost);
# one instance serves every thread (each `encode` makes its own C encoder), with the same bytes.
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def canonical_json(value: Any) -> str:
    """Sorted keys, compact separators, UTF-8 kept: the exact bytes the hash covers."""
    return _CANONICAL.encode(value)


# What a row records, as staged; the chain adds `seq`, `prev_hash`, `key_id` and `hash`.
RECORDED = ("at", "kind", "run_id", "approval_id", "platform", "actor", "tool", "status", "data")
HASHED = ("seq", *RECORDED, "prev_hash")


def _getter(row: Any) -> Any:
    return row.get if isinstance(row, dict) else (lambda k: getattr(row, k, None))


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def row_content(row: Any) -> dict[str, Any]:
    """The hashed fields of a row (everything but `hash` and `key_id`), timestamps as ISO text."""
    get = _getter(row)
    content = {k: get(k) for k in HASHED}
    content["at"] = _iso(content["at"])
    return content


def compute_hash(row: AuditEvent | dict[str, Any]) -> str:
    """The legacy, unkeyed hash (rows chained before the audit key existed)."""
    return hashlib.sha256(canonical_json(row_content(row)).encode("utf-8")).hexdigest()


def keyed_hash(key: bytes, row: Any) -> str:
    """HMAC-SHA256 under `key` of the row's hashed fields and its `key_id`."""
    content = {**row_content(row), "key_id": _getter(row)("key_id")}
    return hmac.new(key, canonical_json(content).encode("utf-8"), hashlib.sha256).hexdigest()


def seal(key: bytes, fields: dict[str, Any]) -> str:
    """The seal of a staged row: `key_id:HMAC` of its recorded fields."""
    content = {k: _iso(fields.get(k)) for k in RECORDED}
    digest = hmac.new(key, b"staged:" + canonical_json(content).encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{key_id(key)}:{digest}"


def seal_problem(keys: AuditKeys, row: Any) -> str | None:
    """Why a staged row's seal does not verify, or None when it does."""
    get = _getter(row)
    stored = get("seal")
    if not stored:
        return "unsealed"
    key = keys.by_id(stored.partition(":")[0])
    if key is None:
        return "sealed with a key that is not in the ring"
    if not hmac.compare_digest(seal(key, {k: get(k) for k in RECORDED}), stored):
        return "seal mismatch"
    return None


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


@dataclass
class _Head:
    """Where the chain ends while a chaining pass extends it."""

    seq: int
    hash: str
    key_id: str | None


class AuditLog:
    """Writes audit rows: sealed and staged inside the caller's transaction, then chained by `chain`.

    `keys` is the key ring; without one, the key file next to the SQLite database (or in the
    working directory) is used, and created at first use.
    """

    def __init__(self, redactor: Redactor, keys: AuditKeys | None = None, *, key_file: Path | None = None) -> None:
        self.redactor = redactor
        self._keys = keys
        self._key_file = key_file
        self._ready = False  # the chain's head is known to be sealed under the current key

    def keys_for(self, url: Any) -> AuditKeys:
        """The key ring (loaded from the key file on first use when none was given)."""
        if self._keys is None:
            self._keys = load_keys(None, self._key_file or default_key_file(url))
            self.redactor.add(self._keys.secrets())
        return self._keys

    async def record(self, session: DbSession, kind: str, **fields_and_data: Any) -> None:
        """Stage one row (fields as for `entry`). Secrets are redacted before it is stored and hashed."""
        await self.record_many(session, [entry(kind, **fields_and_data)])

    async def record_many(self, session: DbSession, entries: list[Entry]) -> None:
        """Stage rows in order, atomically with the caller's transaction. No lock is taken here."""
        if not entries:
            return
        key = self.keys_for(session.bind.url).current
        now = utcnow()
        rows = [
            {"at": now, "kind": e.kind, **e.fields, "data": orjson.loads(canonical_json(self.redactor.redact(e.data)))}
            for e in entries
        ]
        for row in rows:
            row["seal"] = seal(key, row)
        await _STAGE.run_many(session, rows)
        session.info["audit_staged"] = True

    async def chain(self, db: Database, batch: int = 500) -> int:
        """Move staged rows into the chain, one writer at a time. Returns how many were chained.

        Raises `AuditKeyError` when the chain's newest row is sealed with a key outside the ring."""
        keys = self.keys_for(db.urls.sync_url)
        total = 0
        while True:
            async with db.transaction() as session:
                if session.bind.dialect.name == "postgresql":
                    await _CHAINER_LOCK.run(session, {"k": _ADVISORY_LOCK_KEY})
                staged = (await _OLDEST_STAGED.run(session, {"b_limit": batch})).all()
                if not staged and self._ready:
                    return total
                head = await _read_head(session)
                rows = _link(keys, head, staged)
                if rows:
                    await _CHAIN.run_many(session, rows)
                if staged:
                    await _UNSTAGE.run(session, {"b_ids": [r.id for r in staged]})
            self._ready = True
            total += len(staged)
            if len(staged) < batch:
                return total


async def _read_head(session: DbSession) -> _Head:
    """The newest row, with the key the next row must use (a rotation row names it)."""
    last = (await _HEAD.run(session)).first()
    if not last:
        return _Head(0, GENESIS_HASH, None)
    seq, digest, kid, kind, data = last
    if kind == ROTATED_KIND and kid is not None and isinstance(data, dict):
        kid = str(data.get("next_key"))
    return _Head(seq, digest, kid)


def _append(rows: list[dict[str, Any]], head: _Head, fields: dict[str, Any], key: bytes | None) -> None:
    """Chain one row after `head` (keyed when `key` is given, else a legacy row) and advance it."""
    row: dict[str, Any] = {"seq": head.seq + 1, **{k: fields.get(k) for k in RECORDED}, "prev_hash": head.hash}
    row["key_id"] = key_id(key) if key is not None else None
    row["hash"] = keyed_hash(key, row) if key is not None else compute_hash(row)
    rows.append(row)
    head.seq, head.hash, head.key_id = row["seq"], row["hash"], row["key_id"]
    if fields.get("kind") == ROTATED_KIND:
        head.key_id = fields["data"]["next_key"]


def _marker(kind: str, **data: Any) -> dict[str, Any]:
    return {"at": utcnow(), "kind": kind, "data": data}


def _link(keys: AuditKeys, head: _Head, staged: Sequence[Any]) -> list[dict[str, Any]]:
    """The rows that extend the chain after `head` with `staged` (plus keying/rotation rows)."""
    rows: list[dict[str, Any]] = []
    if head.key_id is None:  # never keyed: rows staged by an older version join the legacy prefix
        while staged and not staged[0].seal:
            _append(rows, head, {k: getattr(staged[0], k) for k in RECORDED}, None)
            staged = staged[1:]
        # Keyed from here on, an empty chain too: its first row names the key, so a replica started
        # with another key fails closed at its start instead of sealing rows nobody can verify.
        legacy = {"legacy_rows": head.seq, "legacy_head": head.hash}
        _append(rows, head, _marker(KEYED_KIND, **legacy), keys.current)
    elif head.key_id != keys.current_id:
        old = keys.by_id(head.key_id)
        if old is None:
            raise AuditKeyError(
                f"the audit chain's row {head.seq} is sealed with key {head.key_id}, which is not in the key ring "
                "(wrong CHATOPS_AUDIT_KEY or key file?)"
            )
        _append(rows, head, _marker(ROTATED_KIND, previous_key=head.key_id, next_key=keys.current_id), old)
    for row in staged:
        fields = {k: getattr(row, k) for k in RECORDED}
        problem = seal_problem(keys, row)
        if problem is not None:
            log.error("audit: staged row %s was altered before chaining (%s); recorded as %s", row.id, problem, TAMPERED_KIND)
            found = {k: _iso(v) for k, v in fields.items()}
            fields = {**_marker(TAMPERED_KIND, staged_id=row.id, problem=problem, found=found), "status": "tampered"}
            fields["data"] = json.loads(canonical_json(fields["data"]))
        _append(rows, head, fields, keys.current)
    return rows


@dataclass(frozen=True)
class ChainProblem:
    """The first row at which the chain stops verifying, and why."""

    seq: int
    reason: str


class _Walk:
    """The verifier's state: which key the next row must be sealed with."""

    def __init__(self, keys: AuditKeys | None) -> None:
        self.keys = keys
        self.key_id: str | None = None  # None: still in the legacy prefix
        self.legacy_rows = 0

    def check(self, row: Any) -> str | None:
        if row.key_id is None:
            if self.key_id is not None:
                return "an unkeyed row after the chain was keyed (forged?)"
            if compute_hash(row) != row.hash:
                return "content does not match its hash"
            self.legacy_rows += 1
            return None
        return self._check_keyed(row)

    def _check_keyed(self, row: Any) -> str | None:
        if self.keys is None:
            return "the row is keyed and no audit key was given"
        if self.key_id is None and self.legacy_rows and row.kind != KEYED_KIND:
            return "the legacy rows are not closed by an audit_keyed row"
        if self.key_id is not None and row.key_id != self.key_id:
            return f"sealed with key {row.key_id}, expected key {self.key_id}"
        key = self.keys.by_id(row.key_id)
        if key is None:
            return f"sealed with key {row.key_id}, which is not in the key ring (wrong key?)"
        if not hmac.compare_digest(keyed_hash(key, row), row.hash):
            return "content does not match its hash (edited, or forged without the key)"
        self.key_id = row.key_id
        if row.kind == ROTATED_KIND and isinstance(row.data, dict):
            self.key_id = str(row.data.get("next_key"))
        return None


def verify_chain(
    rows: Iterable[Any], keys: AuditKeys | None = None, *, start_hash: str = GENESIS_HASH, start_seq: int = 1
) -> ChainProblem | None:
    """Check every link of rows ordered by seq. Returns the first problem, or None when intact.

    With `keys`, a chain that holds rows must end keyed: an all-legacy chain (or one whose keyed
    rows were replaced by unkeyed ones) is refused."""
    expected_prev, expected_seq = start_hash, start_seq
    walk = _Walk(keys)
    last_seq = None
    for row in rows:
        if row.seq != expected_seq:
            return ChainProblem(
                expected_seq if row.seq > expected_seq else row.seq, f"expected row {expected_seq}, found row {row.seq}"
            )
        if row.prev_hash != expected_prev:
            return ChainProblem(row.seq, "prev_hash does not match the previous row")
        if (reason := walk.check(row)) is not None:
            return ChainProblem(row.seq, reason)
        expected_prev, expected_seq, last_seq = row.hash, row.seq + 1, row.seq
    if keys is not None and last_seq is not None and walk.key_id is None:
        return ChainProblem(last_seq, "the chain holds no row sealed under the audit key")
    return None


def iter_rows(session: sa.orm.Session, batch: int = 2000) -> Iterator[AuditEvent]:
    """All audit rows in order, read in batches (sync session, for the CLI)."""
    last = 0
    while True:
        chunk = (
            session.execute(sa.select(AuditEvent).where(col(AuditEvent.seq) > last).order_by(col(AuditEvent.seq)).limit(batch))
            .scalars()
            .all()
        )
        if not chunk:
            return
        yield from chunk
        last = chunk[-1].seq
