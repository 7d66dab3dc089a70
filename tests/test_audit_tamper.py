"""Tamper evidence: random edits, deletions, forged insertions (with recomputed hashes) and swaps are
all detected at the right row; truncation and wholesale rewrites are detected against an anchor."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from bot.cli import run as chatops
from storage.audit import GENESIS_HASH, AuditLog, compute_hash, verify_chain
from storage.engine import Database, make_sync_engine, normalise_url
from storage.migrate import upgrade
from storage.models import AuditEvent, utcnow
from storage.redact import Redactor

CAMPAIGN = int(os.environ.get("CHATOPS_TAMPER_CASES", "1000"))


def build_chain(n: int) -> list[AuditEvent]:
    """A valid chain built exactly as AuditLog builds one (the rows are what the verifier reads)."""
    rows: list[AuditEvent] = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        row = AuditEvent(
            seq=seq,
            at=utcnow(),
            kind=random.choice(["a", "b", "c"]),
            run_id=f"run-{seq % 7}",
            actor=f"slack:T1:U{seq % 5}",
            tool="send_email",
            status="ok",
            data={"i": seq, "text": "张三"},
            prev_hash=prev,
            hash="",
        )
        row.hash = compute_hash(row)
        rows.append(row)
        prev = row.hash
    return rows


def clone(rows: list[AuditEvent]) -> list[SimpleNamespace]:
    """Plain copies of the rows (the verifier reads attributes; SQLModel objects are slow to copy)."""
    return [SimpleNamespace(**{c: copy.copy(getattr(r, c)) for c in AuditEvent.model_fields}) for r in rows]


def tamper(rows: list[AuditEvent], rng: random.Random) -> tuple[list[AuditEvent], int]:
    """Apply one random mutation as it can happen in the table (rows keyed and read in seq order);
    return the chain and the seq the verifier must name (the first row that no longer verifies)."""
    rows = clone(rows)
    kind = rng.choice(["edit", "edit_rehash", "delete", "insert", "swap"])
    i = rng.randrange(len(rows) - 1)
    x = rows[i].seq
    if kind == "edit":
        field = rng.choice(["actor", "status", "data", "kind", "tool", "at"])
        setattr(rows[i], field, rows[i + 1].at if field == "at" else ({"forged": True} if field == "data" else "forged"))
        if field == "at" and rows[i].at == rows[i + 1].at:
            rows[i].actor = "forged"
        return rows, x
    if kind == "edit_rehash":  # the attacker recomputes the edited row's own hash: its successor's link breaks
        rows[i].actor = "slack:T1:UATTACKER"
        rows[i].hash = compute_hash(rows[i])
        return rows, x + 1
    if kind == "delete":
        del rows[i]
        return rows, x
    if kind == "insert":  # a forged row with a valid hash and link after row x; the tail is renumbered
        forged = SimpleNamespace(
            seq=x + 1,
            at=rows[i].at,
            kind="approval_decided",
            run_id=None,
            approval_id=None,
            platform=None,
            actor="slack:T1:UATTACKER",
            tool=None,
            status=None,
            data={},
            prev_hash=rows[i].hash,
            hash="",
        )
        forged.hash = compute_hash(forged)
        for later in rows[i + 1 :]:
            later.seq += 1
        rows.insert(i + 1, forged)
        return rows, x + 2
    # swap: rows x and x+1 exchange everything but their keys (the table's order is its key order)
    a, b = rows[i], rows[i + 1]
    for column in AuditEvent.model_fields:
        if column != "seq":
            va, vb = getattr(a, column), getattr(b, column)
            setattr(a, column, vb)
            setattr(b, column, va)
    return rows, x


def test_a_clean_chain_verifies():
    assert verify_chain(build_chain(500)) is None


def test_random_tampering_is_always_detected_at_the_right_row():
    rng = random.Random(20261121)
    base = build_chain(120)
    missed, wrong = [], []
    for case in range(CAMPAIGN):
        rows, expected = tamper(base, rng)
        problem = verify_chain(rows)
        if problem is None:
            missed.append(case)
        elif problem.seq != expected:
            wrong.append((case, problem.seq, expected, problem.reason))
    assert missed == [] and wrong == []


async def test_verify_and_anchor_commands_detect_edits_truncation_and_rewrites(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    db = Database(url)
    audit = AuditLog(Redactor())
    for i in range(30):
        async with db.transaction() as session:
            await audit.record(session, "step", actor="terminal:local:alice", i=i)
    await audit.chain(db)
    await db.dispose()
    monkeypatch.setenv("DATABASE_URL", url)
    anchors = tmp_path / "anchors.jsonl"
    assert await asyncio.to_thread(chatops, ["audit", "anchor", "--append", str(anchors)]) == 0
    assert json.loads(anchors.read_text())["seq"] == 30
    assert await asyncio.to_thread(chatops, ["audit", "verify", "--anchors", str(anchors)]) == 0

    engine = make_sync_engine(normalise_url(url))
    with engine.begin() as conn:  # truncate the tail: the chain itself still verifies...
        conn.execute(sa.delete(AuditEvent).where(AuditEvent.seq > 25))
    from storage.audit import iter_rows

    with sa.orm.Session(engine) as session:
        assert verify_chain(iter_rows(session)) is None
    assert await asyncio.to_thread(chatops, ["audit", "verify", "--anchors", str(anchors)]) == 1  # ...but not against the anchor

    with engine.begin() as conn:  # edit a row in the middle
        conn.execute(sa.update(AuditEvent).where(AuditEvent.seq == 7).values(actor="terminal:local:mallory"))
    assert await asyncio.to_thread(chatops, ["audit", "verify"]) == 1


def test_verify_names_the_first_bad_row(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)

    async def fill() -> None:
        db = Database(url)
        for i in range(10):
            async with db.transaction() as session:
                await AuditLog(Redactor()).record(session, "step", i=i)
        await AuditLog(Redactor()).chain(db)
        await db.dispose()

    asyncio.run(fill())
    engine = make_sync_engine(normalise_url(url))
    with engine.begin() as conn:
        conn.execute(sa.update(AuditEvent).where(AuditEvent.seq == 4).values(status="forged"))
    monkeypatch.setenv("DATABASE_URL", url)
    assert chatops(["audit", "verify"]) == 1
    assert "first bad row is 4" in capsys.readouterr().out


@pytest.mark.slow
def test_long_tamper_campaign():
    """CHATOPS_SLOW=1: 20,000 more tamperings on a longer chain."""
    if not os.environ.get("CHATOPS_SLOW"):
        pytest.skip("set CHATOPS_SLOW=1 for the long campaign (CI runs the 1,000-case sample above)")
    rng = random.Random(7)
    base = build_chain(400)
    for _ in range(20_000):
        rows, expected = tamper(base, rng)
        problem = verify_chain(rows)
        assert problem is not None and problem.seq == expected


def test_anchor_file_lines_must_be_ours(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    monkeypatch.setenv("DATABASE_URL", url)
    bad = tmp_path / "anchors.jsonl"
    bad.write_text("not json\n")
    from bot.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "verify", "--anchors", str(bad)])
    assert exit_info.value.code == 2
    assert "not an anchor line" in capsys.readouterr().err
    assert Path(bad).exists()
