"""The keyed, anchored audit chain on a real database, through `chatops audit ...` as an operator runs it.

An attacker here can write to the database (not to the key file or the anchor file): a forged
append, an edited staged row, a truncated tail, a chain checked with the wrong key — all detected.
Rotation keeps the whole chain verifiable with the ring; an unkeyed database from before the key
keeps verifying as a legacy prefix, and nothing can be appended to it unkeyed afterwards.
"""

from __future__ import annotations

import asyncio
import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from bot.app import build_app
from bot.cli import run as chatops
from bot.core.errors import ConfigError
from storage.audit import GENESIS_HASH, KEYED_KIND, ROTATED_KIND, TAMPERED_KIND, AuditLog, compute_hash, keyed_hash, seal
from storage.audit_keys import default_key_file, key_id
from storage.engine import Database, make_sync_engine, normalise_url
from storage.migrate import upgrade
from storage.models import AuditEvent, AuditStaged, utcnow
from storage.redact import Redactor
from tests.conftest import make_settings


async def _fill(url: str, n: int, audit: AuditLog | None = None) -> AuditLog:
    audit = audit or AuditLog(Redactor())
    db = Database(url)
    try:
        for i in range(n):
            async with db.transaction() as session:
                await audit.record(session, "step", actor="terminal:local:alice", i=i)
        await audit.chain(db)
    finally:
        await db.dispose()
    return audit


def _cli(url: str, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setenv("DATABASE_URL", url)
    return chatops(["audit", *argv])


def _engine(url: str) -> sa.Engine:
    return make_sync_engine(normalise_url(url))


def _rows(url: str) -> list[AuditEvent]:
    with sa.orm.Session(_engine(url)) as session:
        return list(session.execute(sa.select(AuditEvent).order_by(AuditEvent.seq)).scalars())


@pytest.fixture
def url(tmp_path: Path) -> str:
    db_url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(db_url)
    return db_url


def test_key_file_is_created_0600_next_to_the_database_and_never_stored(url, monkeypatch, capsys):
    asyncio.run(_fill(url, 5))
    key_file = default_key_file(url)
    assert key_file.parent == Path(_engine(url).url.database).parent
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert _cli(url, monkeypatch, "export") == 0
    exported = capsys.readouterr().out
    assert len(exported.splitlines()) == 1 + 5 and key not in exported  # the chain is keyed first
    assert {r.key_id for r in _rows(url)} == {key_id(key.encode())}
    with _engine(url).connect() as conn:
        dump = "\n".join(conn.connection.driver_connection.iterdump())
    assert key not in dump


def test_forged_append_is_detected_without_anchors(url, monkeypatch, capsys):
    asyncio.run(_fill(url, 10))
    head = _rows(url)[-1]
    forged = {c: getattr(head, c) for c in AuditEvent.model_fields}
    forged.update(seq=head.seq + 1, prev_hash=head.hash, actor="slack:T1:UATTACKER", kind="approval_decided")
    for key in (None, head.key_id):  # a legacy-looking row, or one that claims the key
        forged["key_id"] = key
        forged["hash"] = compute_hash(forged)
        with _engine(url).begin() as conn:
            conn.execute(sa.delete(AuditEvent).where(AuditEvent.seq == head.seq + 1))
            conn.execute(sa.insert(AuditEvent).values(**forged))
        assert _cli(url, monkeypatch, "verify") == 1
        assert f"first bad row is {head.seq + 1}" in capsys.readouterr().out


def test_an_edited_staged_row_is_reported_not_chained_silently(url, monkeypatch, capsys):
    async def stage() -> None:
        db = Database(url)
        async with db.transaction() as session:
            await AuditLog(Redactor()).record(session, "approval_decided", actor="slack:T1:UALICE", decision="rejected")
        await db.dispose()

    asyncio.run(_fill(url, 3))
    asyncio.run(stage())
    with _engine(url).begin() as conn:
        conn.execute(sa.update(AuditStaged).values(data={"decision": "approved"}))
    assert _cli(url, monkeypatch, "verify") == 1
    out = capsys.readouterr().out
    assert "row 5 records a staged row altered before chaining (seal mismatch)" in out  # after audit_keyed and 3
    row = _rows(url)[-1]
    assert row.kind == TAMPERED_KIND and row.data["found"]["data"] == {"decision": "approved"}
    with _engine(url).begin() as conn:  # an unsealed row slipped into the staging table
        conn.execute(sa.insert(AuditStaged).values(at=utcnow(), kind="approval_decided", data={}))
    assert _cli(url, monkeypatch, "verify") == 1
    assert "(unsealed)" in capsys.readouterr().out


async def test_the_running_bot_anchors_the_head_and_truncation_is_detected(bots, tmp_path, monkeypatch):
    anchors = tmp_path / "elsewhere" / "anchors.jsonl"
    app = await bots.start(CHATOPS_AUDIT_ANCHOR_FILE=str(anchors), CHATOPS_AUDIT_ANCHOR_INTERVAL="3600")
    await bots.run(app)
    async with app.ctx.db.transaction() as session:
        for i in range(12):
            await app.ctx.audit.record(session, "step", i=i)
    await app.stop()
    bots.apps.clear()
    url = app.settings.database_url
    last = json.loads(anchors.read_text().splitlines()[-1])
    assert (last["seq"], last["hash"]) == (_rows(url)[-1].seq, _rows(url)[-1].hash) and last["seq"] >= 12
    assert await asyncio.to_thread(_cli, url, monkeypatch, "verify", "--anchors", str(anchors)) == 0
    with _engine(url).begin() as conn:
        conn.execute(sa.delete(AuditEvent).where(AuditEvent.seq > 5))
    assert await asyncio.to_thread(_cli, url, monkeypatch, "verify") == 0  # a truncated chain is still a chain...
    assert await asyncio.to_thread(_cli, url, monkeypatch, "verify", "--anchors", str(anchors)) == 1  # ...not the anchored one


def test_key_rotation_continues_the_chain_under_the_new_key(url, monkeypatch, capsys):
    asyncio.run(_fill(url, 4))
    key_file = default_key_file(url)
    old = key_file.read_text().split()
    assert _cli(url, monkeypatch, "rotate-key") == 0
    ring = key_file.read_text().split()
    assert len(ring) == 2 and ring[0] == old[0] and "back up" in capsys.readouterr().out
    asyncio.run(_fill(url, 3))
    rows = _rows(url)
    rotation = rows[5]  # after audit_keyed and 4
    assert rotation.kind == ROTATED_KIND and rotation.key_id == key_id(ring[0].encode())
    assert rotation.data == {"previous_key": key_id(ring[0].encode()), "next_key": key_id(ring[1].encode())}
    assert {r.key_id for r in rows[6:]} == {key_id(ring[1].encode())}
    assert _cli(url, monkeypatch, "verify") == 0
    assert "OK: 9 rows" in capsys.readouterr().out
    monkeypatch.setenv("CHATOPS_AUDIT_KEY", ring[1])  # the old key lost: its rows cannot be checked
    assert _cli(url, monkeypatch, "verify") == 1
    assert "first bad row is 1" in capsys.readouterr().out
    monkeypatch.setenv("CHATOPS_AUDIT_KEY", ring[0])  # the new key lost
    assert _cli(url, monkeypatch, "verify") == 1
    assert "first bad row is 7" in capsys.readouterr().out
    monkeypatch.setenv("CHATOPS_AUDIT_KEY", f"{ring[0]} {ring[1]}")  # the ring in the environment
    assert _cli(url, monkeypatch, "verify") == 0


def test_rotation_with_the_key_in_the_environment_is_explained(url, monkeypatch, capsys):
    monkeypatch.setenv("CHATOPS_AUDIT_KEY", "k" * 40)
    from bot.cli import main

    with pytest.raises(SystemExit) as info:
        main(["audit", "rotate-key"])
    assert info.value.code == 2 and "'OLD NEW'" in capsys.readouterr().err
    monkeypatch.setenv("CHATOPS_AUDIT_KEY", "short")
    with pytest.raises(SystemExit):
        main(["audit", "verify"])
    err = capsys.readouterr().err
    assert "at least 32 characters" in err and "short" not in err.replace("at least", "")


async def test_a_wrong_key_is_detected_and_the_bot_refuses_to_start(url, monkeypatch, model, capsys):
    await _fill(url, 3)
    monkeypatch.setenv("CHATOPS_AUDIT_KEY", "w" * 40)
    assert await asyncio.to_thread(_cli, url, monkeypatch, "verify") == 1
    assert "not in the key ring" in capsys.readouterr().out
    app = await build_app(make_settings(model.url, url, CHATOPS_AUDIT_KEY="w" * 40))
    try:
        with pytest.raises(ConfigError, match="CHATOPS_AUDIT_KEY"):
            await app.start(serve_http=False)
    finally:
        await app.ctx.db.dispose()


async def test_a_second_replica_with_another_key_refuses_to_start_before_anything_is_recorded(postgres_url, model):
    """Two replicas on one database, each with its own key (compose gave each container its own key
    file): both started, the first row the second one staged was chained as `audit_staged_tampered`,
    and `audit verify` failed. The first start now keys the empty chain, so the second fails closed."""
    first = await build_app(make_settings(model.url, postgres_url, CHATOPS_AUDIT_KEY="a" * 40))
    second = await build_app(make_settings(model.url, postgres_url, CHATOPS_AUDIT_KEY="b" * 40))
    try:
        await first.start(serve_http=False)
        with pytest.raises(ConfigError, match=r"CHATOPS_AUDIT_KEY.*not in the key ring"):
            await second.start(serve_http=False)
        (keyed,) = _rows(postgres_url)
        assert (keyed.kind, keyed.key_id, keyed.data["legacy_rows"]) == (KEYED_KIND, key_id(b"a" * 40), 0)
    finally:
        await first.stop()
        await second.ctx.db.dispose()


def _legacy_table(model: type) -> sa.Table:
    """The table as revision 0002 left it (no key_id / seal column)."""
    columns = [c.copy() for c in model.__table__.c if c.name not in ("key_id", "seal")]
    return sa.Table(model.__tablename__, sa.MetaData(), *columns)


def test_an_unkeyed_database_keeps_its_rows_as_a_legacy_prefix(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    upgrade(url, "0002")  # a database written before the key existed: unkeyed rows, one row still staged
    prev = GENESIS_HASH
    with _engine(url).begin() as conn:
        for seq in range(1, 6):
            row = {"seq": seq, "at": utcnow(), "kind": "old", "run_id": None, "approval_id": None, "platform": None}
            row.update(actor="terminal:local:alice", tool=None, status=None, data={"i": seq}, prev_hash=prev)
            row["hash"] = prev = compute_hash(row)
            conn.execute(sa.insert(_legacy_table(AuditEvent)).values(**row))
        conn.execute(sa.insert(_legacy_table(AuditStaged)).values(at=utcnow(), kind="old_staged", data={"i": 6}))
    upgrade(url)  # migrated: its rows stay as they are
    assert _cli(url, monkeypatch, "verify") == 0
    assert "OK: 7 rows (6 legacy unkeyed rows first)" in capsys.readouterr().out
    rows = _rows(url)
    assert [r.kind for r in rows] == ["old"] * 5 + ["old_staged", KEYED_KIND]
    assert rows[6].data == {"legacy_rows": 6, "legacy_head": rows[5].hash} and rows[6].key_id is not None
    asyncio.run(_fill(url, 2))
    assert _cli(url, monkeypatch, "verify") == 0
    capsys.readouterr()
    head = _rows(url)[-1]  # an unkeyed row cannot be appended after the marker
    forged = {c: getattr(head, c) for c in AuditEvent.model_fields}
    forged.update(seq=head.seq + 1, prev_hash=head.hash, key_id=None)
    forged["hash"] = compute_hash(forged)
    with _engine(url).begin() as conn:
        conn.execute(sa.insert(AuditEvent).values(**forged))
    assert _cli(url, monkeypatch, "verify") == 1
    assert "unkeyed row after the chain was keyed" in capsys.readouterr().out


def test_seals_and_hashes_keep_the_bytes_chains_were_written_with():
    """A chain written by an earlier version must still verify: the seal and the link hash of one
    row (CJK, escapes, floats with exponents, an integer beyond 64 bits, timestamps, nesting) are
    pinned to the values the first keyed version computed. A faster serialiser that changes one
    byte of `canonical_json` fails here."""
    key = bytes(range(32))
    data = {
        "subject": '客户张三 — 介绍 \u2028 "quoted" \\ \n\t', "amount": 1e16, "ratio": 1e-05, "price": 12.5, "big": 2**70,
        "flags": [True, False, None], "when": datetime(2026, 1, 2, tzinfo=UTC), "nested": {"b": 1, "a": [{"z": 0, "y": "é"}]},
    }  # fmt: skip
    row = {
        "seq": 7, "at": datetime(2026, 12, 4, 17, 0, 0, 123456, tzinfo=UTC), "kind": "tool_result", "run_id": "run-1",
        "approval_id": "ap-1", "platform": "feishu", "actor": "feishu:ou_1", "tool": "send_email", "status": "ok",
        "prev_hash": "ab" * 32, "key_id": key_id(key), "data": data,
    }  # fmt: skip
    assert seal(key, row) == "01e28d56b0f26508:41f1b96ec1cdab491ee32c2ade7300abe19a0ae65b7b02303be41941560d61ff"
    assert keyed_hash(key, row) == "ad3ff57bef960f60b372edf41a957a46c187ed85439eb919d8eac16afe634926"
