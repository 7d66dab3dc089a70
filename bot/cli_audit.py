"""`chatops audit ...`: list, show, export, verify and anchor the audit trail (sync, read-only);
rotating the audit key is in `bot/cli.py` (it writes the rotation row through `AuditLog.chain`)."""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlmodel import col

from bot.core import display
from bot.core.errors import ChatopsError
from storage.audit import GENESIS_HASH, TAMPERED_KIND, ChainProblem, iter_rows, row_content, seal_problem, verify_chain
from storage.audit_anchor import AnchorFileError, anchor_line, append_anchor, read_anchors
from storage.audit_keys import AuditKeys
from storage.engine import make_sync_engine, normalise_url
from storage.models import AuditEvent, AuditStaged, InboxEvent

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str) -> datetime:
    """`2h`, `3d`, `2026-11-20` or a full ISO timestamp (UTC unless it says otherwise)."""
    try:
        if match := _DURATION.match(value.strip()):
            return datetime.now(UTC) - timedelta(**{_UNITS[match[2]]: int(match[1])})
        parsed = datetime.fromisoformat(value.strip())
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):  # not a date, or one outside years 1-9999 once in UTC
        raise ChatopsError(f"--since: {value!r} is neither a duration like 2h/3d nor an ISO date") from None


def _session(database_url: str) -> Session:
    """A read-only session: on SQLite a deferred BEGIN, so listing, exporting and verifying a large log
    never holds the write lock the running bot's acks need."""
    return Session(make_sync_engine(normalise_url(database_url)).execution_options(chatops_read=True))


def row_dict(row: AuditEvent) -> dict[str, Any]:
    """A chained row as exported: its hashed content plus its key id and hash."""
    return {**row_content(row), "key_id": row.key_id, "hash": row.hash}


def _line(row: AuditEvent) -> str:
    """One row for a terminal: text fields (a tool name is whatever the model asked for) spelled out
    by `display.one_line`, so an escape sequence or a line break cannot restyle the terminal or forge
    a row."""
    texts = (row.kind, row.run_id, row.approval_id, row.actor, row.tool, row.status)
    return "  ".join([str(row.seq), row.at.strftime("%Y-%m-%d %H:%M:%S"), *(display.one_line(t) if t else "-" for t in texts)])


def audit_list(
    database_url: str,
    *,
    user: str | None,
    tool: str | None,
    status: str | None,
    since: str | None,
    limit: int,
    out: TextIO | None = None,
) -> None:
    out = out or sys.stdout
    query = sa.select(AuditEvent).order_by(col(AuditEvent.seq).desc()).limit(limit)
    if user:
        query = query.where(col(AuditEvent.actor).contains(user))
    if tool:
        query = query.where(col(AuditEvent.tool) == tool)
    if status:
        query = query.where(col(AuditEvent.status) == status)
    if since:
        query = query.where(col(AuditEvent.at) >= parse_since(since))
    with _session(database_url) as session:
        rows = list(reversed(session.execute(query).scalars().all()))
    out.write("seq  at  kind  run  approval  actor  tool  status\n")
    for row in rows:
        out.write(_line(row) + "\n")


def run_rows(session: Session, ref: str) -> list[AuditEvent]:
    """Every row of one run (or of the run an approval id belongs to), its request included, by seq."""
    run_id = ref
    if ref.startswith("ap-"):
        owner = session.execute(sa.select(col(AuditEvent.run_id)).where(col(AuditEvent.approval_id) == ref).limit(1)).scalar()
        run_id = owner or ref
    inbox_ids = session.execute(sa.select(col(InboxEvent.id)).where(col(InboxEvent.run_id) == run_id)).scalars().all()
    rows = (
        session.execute(sa.select(AuditEvent).where(col(AuditEvent.run_id) == run_id).order_by(col(AuditEvent.seq)))
        .scalars()
        .all()
    )
    if not rows:
        return []
    requests = (
        [
            r
            for r in session.execute(sa.select(AuditEvent).where(col(AuditEvent.kind) == "request_received")).scalars()
            if (r.data or {}).get("inbox_id") in inbox_ids
        ]
        if inbox_ids
        else []
    )
    return sorted([*requests, *rows], key=lambda r: r.seq)


def audit_show(database_url: str, ref: str, out: TextIO | None = None) -> None:
    """Every row of one run (or of the run an approval id belongs to), request included."""
    out = out or sys.stdout
    with _session(database_url) as session:
        rows = run_rows(session, ref)
    if not rows:
        raise ChatopsError(f"no audit rows for {ref!r}")
    for row in rows:
        out.write(_line(row) + "\n")
        if row.data:
            out.write("    " + display.inert(json.dumps(row.data, ensure_ascii=False, sort_keys=True)) + "\n")


CSV_HEADER = (
    "seq",
    "at",
    "kind",
    "run_id",
    "approval_id",
    "platform",
    "actor",
    "tool",
    "status",
    "data",
    "prev_hash",
    "key_id",
    "hash",
)


def write_jsonl(rows: Iterable[AuditEvent], stream: TextIO) -> None:
    """Rows as JSON lines, each with its hashed content and its hash."""
    for row in rows:
        stream.write(json.dumps(row_dict(row), ensure_ascii=False) + "\n")


# A cell a spreadsheet would take for a formula (`=HYPERLINK(...)` as a tool name the model chose).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A CSV cell as a spreadsheet shows it: text that would start a formula gets a leading `'`."""
    return f"'{value}" if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def write_csv(rows: Iterable[AuditEvent], stream: TextIO, *, header: bool = True) -> None:
    """Rows as CSV (`data` as compact JSON), with the header line unless `header=False`. Meant for
    spreadsheets: a text cell that would start a formula is prefixed with `'` (JSONL is verbatim)."""
    writer = csv.writer(stream)
    if header:
        writer.writerow(CSV_HEADER)
    for row in rows:
        d = row_dict(row)
        d["data"] = json.dumps(d["data"], ensure_ascii=False, sort_keys=True)
        writer.writerow([_cell(d[h]) for h in CSV_HEADER])


def audit_export(database_url: str, fmt: str, output: Path | None) -> None:
    stream: TextIO = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
    try:
        with _session(database_url) as session:
            (write_jsonl if fmt == "jsonl" else write_csv)(iter_rows(session), stream)
    finally:
        if output:
            stream.close()


def _staged_problems(session: Session, keys: AuditKeys) -> list[str]:
    rows = session.execute(sa.select(*sa.inspect(AuditStaged).columns).order_by(col(AuditStaged.id))).all()
    return [f"staged row {row.id}: {why}" for row in rows if (why := seal_problem(keys, row)) is not None]


def _anchor_problem(session: Session, anchor: Path) -> str | None:
    try:
        anchors = read_anchors(anchor)
    except AnchorFileError as exc:
        raise ChatopsError(f"{exc} (expected lines written by `chatops audit anchor` or the running bot)") from None
    except OSError as exc:
        raise ChatopsError(f"--anchors: cannot read {anchor} ({type(exc).__name__})") from None
    for item in anchors:
        if item.seq == 0:
            continue  # anchored while the log was empty
        stored = session.execute(sa.select(col(AuditEvent.hash)).where(col(AuditEvent.seq) == item.seq)).scalar()
        if stored != item.hash:
            why = "is missing (truncated?)" if stored is None else "has a different hash (rewritten?)"
            return f"anchored row {item.seq} {why}"
    return None


def chain_problem(session: Session, keys: AuditKeys | None) -> ChainProblem | None:
    """Verify the whole chain under the key ring; the first bad row, or None when intact. Every
    verifier (the CLI, the audit page) calls this."""
    return verify_chain(iter_rows(session), keys)


def audit_verify(database_url: str, anchor: Path | None, keys: AuditKeys, out: TextIO | None = None) -> bool:
    """Check the whole chain under the key ring, the staged rows, and every anchor in `anchor`."""
    out = out or sys.stdout
    with _session(database_url) as session:
        problem = chain_problem(session, keys)
        last = session.execute(
            sa.select(col(AuditEvent.seq), col(AuditEvent.hash)).order_by(col(AuditEvent.seq).desc()).limit(1)
        ).first()
        legacy = session.execute(sa.select(sa.func.count()).where(col(AuditEvent.key_id).is_(None))).scalar() or 0
        tampered = session.execute(
            sa.select(col(AuditEvent.seq), col(AuditEvent.data)).where(col(AuditEvent.kind) == TAMPERED_KIND)
        ).all()
        failures = [
            f"row {seq} records a staged row altered before chaining ({(data or {}).get('problem')})" for seq, data in tampered
        ]
        failures += _staged_problems(session, keys)
        if anchor is not None and (why := _anchor_problem(session, anchor)) is not None:
            failures.append(why)
    if problem is not None:
        failures.insert(0, f"first bad row is {problem.seq}: {problem.reason}")
    for failure in failures:
        out.write(f"FAILED: {failure}\n")
    if failures:
        return False
    count, head = (last[0], last[1]) if last else (0, GENESIS_HASH)
    note = f" ({legacy} legacy unkeyed rows first)" if legacy else ""
    out.write(f"OK: {count} rows{note}, chain intact, head {head}\n")
    return True


def audit_anchor(database_url: str, append: Path | None, out: TextIO | None = None) -> None:
    """Print (or append to a file kept outside the database) the current head of the chain."""
    out = out or sys.stdout
    with _session(database_url) as session:
        last = session.execute(
            sa.select(col(AuditEvent.seq), col(AuditEvent.hash)).order_by(col(AuditEvent.seq).desc()).limit(1)
        ).first()
    seq, digest = (last[0], last[1]) if last else (0, GENESIS_HASH)
    line = append_anchor(append, seq, digest) if append is not None else anchor_line(seq, digest)
    out.write(line + "\n")
