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
from storage.audit import GENESIS_HASH, ROTATED_KIND, AuditLog, compute_hash, keyed_hash, verify_chain
from storage.audit_keys import AuditKeys, key_id
from storage.engine import Database, make_sync_engine, normalise_url
from storage.migrate import upgrade
from storage.models import AuditEvent, utcnow
from storage.redact import Redactor

CAMPAIGN = int(os.environ.get("CHATOPS_TAMPER_CASES", "1000"))
OLD_KEY, NEW_KEY = "a" * 64, "b" * 64
RING = AuditKeys((OLD_KEY.encode(), NEW_KEY.encode()))
ROTATE_AT = 60


def _row(seq: int, prev: str, kind: str, data: dict, key: bytes) -> AuditEvent:
    row = AuditEvent(
        seq=seq,
        at=utcnow(),
        kind=kind,
        run_id=f"run-{seq % 7}",
        actor=f"slack:T1:U{seq % 5}",
        tool="send_email",
        status="ok",
        data=data,
        prev_hash=prev,
        hash="",
        key_id=key_id(key),
    )
    row.hash = keyed_hash(key, row)
    return row


def build_chain(n: int) -> list[AuditEvent]:
    """A valid keyed chain built as AuditLog builds one, rotated from OLD_KEY to NEW_KEY at row 60."""
    rows: list[AuditEvent] = []
    prev, key = GENESIS_HASH, OLD_KEY.encode()
    for seq in range(1, n + 1):
        if seq == ROTATE_AT:
            row = _row(seq, prev, ROTATED_KIND, {"previous_key": key_id(key), "next_key": key_id(NEW_KEY.encode())}, key)
            key = NEW_KEY.encode()
        else:
            row = _row(seq, prev, random.choice(["a", "b", "c"]), {"i": seq, "text": "张三"}, key)
        rows.append(row)
        prev = row.hash
    return rows


def clone(rows: list[AuditEvent]) -> list[SimpleNamespace]:
    """Plain copies of the rows (the verifier reads attributes; SQLModel objects are slow to copy)."""
    return [SimpleNamespace(**{c: copy.copy(getattr(r, c)) for c in AuditEvent.model_fields}) for r in rows]


def _forge(rows: list[SimpleNamespace], after: int, rng: random.Random) -> SimpleNamespace:
    """A row an attacker without the key writes after `rows[after]`: valid link, a hash they can compute."""
    forged = SimpleNamespace(**{c: copy.copy(getattr(rows[after], c)) for c in AuditEvent.model_fields})
    forged.seq, forged.prev_hash = rows[after].seq + 1, rows[after].hash
    forged.kind, forged.actor, forged.data = "approval_decided", "slack:T1:UATTACKER", {"forged": True}
    how = rng.choice(["unkeyed", "unkeyed_key_id", "guessed_key"])
    if how == "unkeyed":  # a legacy-looking row: SHA-256, no key id
        forged.key_id = None
        forged.hash = compute_hash(forged)
    elif how == "unkeyed_key_id":
        forged.hash = compute_hash(forged)
    else:
        forged.hash = keyed_hash(b"guess" * 8, forged)
    return forged


def tamper(rows: list[AuditEvent], rng: random.Random) -> tuple[list[AuditEvent], int]:
    """Apply one random mutation as it can happen in the table (rows keyed and read in seq order);
    return the chain and the seq the verifier must name (the first row that no longer verifies)."""
    rows = clone(rows)
    kind = rng.choice(["edit", "edit_rehash", "delete", "insert", "swap", "append", "key_id"])
    i = rng.randrange(len(rows) - 1)
    x = rows[i].seq
    if kind == "edit":
        field = rng.choice(["actor", "status", "data", "kind", "tool", "at"])
        setattr(rows[i], field, rows[i + 1].at if field == "at" else ({"forged": True} if field == "data" else "forged"))
        if field == "at" and rows[i].at == rows[i + 1].at:
            rows[i].actor = "forged"
        return rows, x
    if kind == "edit_rehash":  # the attacker recomputes the edited row's hash as best they can: not keyed
        rows[i].actor = "slack:T1:UATTACKER"
        rows[i].hash = compute_hash(rows[i]) if rng.random() < 0.5 else keyed_hash(b"guess" * 8, rows[i])
        return rows, x
    if kind == "key_id":  # relabel a row with the other key of the ring
        rows[i].key_id = key_id(NEW_KEY.encode() if rows[i].key_id == key_id(OLD_KEY.encode()) else OLD_KEY.encode())
        return rows, x
    if kind == "delete":
        del rows[i]
        return rows, x
    if kind == "append":  # seq = max+1, prev_hash = head, a recomputed hash: the classic forged append
        rows.append(_forge(rows, len(rows) - 1, rng))
        return rows, rows[-1].seq
    if kind == "insert":  # a forged row after row x; the tail is renumbered
        forged = _forge(rows, i, rng)
        for later in rows[i + 1 :]:
            later.seq += 1
        rows.insert(i + 1, forged)
        return rows, x + 1
    # swap: rows x and x+1 exchange everything but their keys (the table's order is its key order)
    a, b = rows[i], rows[i + 1]
    for column in AuditEvent.model_fields:
        if column != "seq":
            va, vb = getattr(a, column), getattr(b, column)
            setattr(a, column, vb)
            setattr(b, column, va)
    return rows, x


def test_a_clean_chain_verifies():
    assert verify_chain(build_chain(500), RING) is None


def test_wrong_or_partial_key_ring_is_detected():
    rows = build_chain(100)
    assert verify_chain(rows, AuditKeys((("c" * 64).encode(),))).seq == 1
    assert verify_chain(rows, AuditKeys((OLD_KEY.encode(),))).seq == ROTATE_AT + 1  # the new key is missing
    assert verify_chain(rows, AuditKeys((NEW_KEY.encode(),))).seq == 1  # the old key is missing
    assert "no audit key" in verify_chain(rows).reason


def test_random_tampering_is_always_detected_at_the_right_row():
    rng = random.Random(20261121)
    base = build_chain(120)
    missed, wrong = [], []
    for case in range(CAMPAIGN):
        rows, expected = tamper(base, rng)
        problem = verify_chain(rows, RING)
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
    assert json.loads(anchors.read_text())["seq"] == 1 + 30  # `audit_keyed`, then the 30 steps
    assert await asyncio.to_thread(chatops, ["audit", "verify", "--anchors", str(anchors)]) == 0

    engine = make_sync_engine(normalise_url(url))
    with engine.begin() as conn:  # truncate the tail: the chain itself still verifies...
        conn.execute(sa.delete(AuditEvent).where(AuditEvent.seq > 25))
    from storage.audit import iter_rows

    with sa.orm.Session(engine) as session:
        assert verify_chain(iter_rows(session), audit.keys_for(url)) is None
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
        problem = verify_chain(rows, RING)
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
