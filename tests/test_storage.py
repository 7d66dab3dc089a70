"""Storage on SQLite and PostgreSQL: migrations, pragmas, timezone-aware timestamps, the audit chain
under concurrent writers, and two replicas sharing one database."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from bot.core.events import DecisionRequest, IncomingMessage, Thread, User
from storage.audit import AuditLog, verify_chain
from storage.audit_keys import default_key_file, load_keys
from storage.engine import Database, make_sync_engine, normalise_url
from storage.migrate import current_revision, head_revision, upgrade
from storage.models import Approval, AuditEvent
from storage.redact import Redactor
from tests.fakes.openai_server import calls, last_user_text, text
from tests.support_tools import Ledger, notes_toolset


def test_migrations_reach_head_and_are_idempotent(db_url):
    upgrade(db_url)
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()


def test_migrations_build_exactly_the_schema_the_models_declare(db_url):
    """A column or index declared on a model but missing from the migrations (or the other way round)
    is a schema the code was never run against: e.g. the outbox's run id index, which keeps an answer
    from reading every sent job."""
    upgrade(db_url)
    engine = make_sync_engine(normalise_url(db_url))
    try:
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_sqlite_connections_use_wal_full_sync_busy_timeout_and_foreign_keys(sqlite_url):
    upgrade(sqlite_url)
    engine = make_sync_engine(normalise_url(sqlite_url))
    with engine.connect() as conn:
        pragmas = {
            p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()
            for p in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
        }
    assert pragmas == {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 5000, "foreign_keys": 1}


async def test_sqlite_writers_keep_one_connection_until_a_transaction_fails(sqlite_url):
    """Committed write transactions reuse the writers' connection (a pool checkout and return cost
    more than most transactions' statements); one that fails gives it up, and the next takes a
    fresh connection and sees everything committed before."""
    upgrade(sqlite_url)
    db = Database(sqlite_url)
    checkouts: list[object] = []
    sa.event.listen(db.sync_engine, "checkout", lambda dbapi, record, proxy: checkouts.append(dbapi))
    audit = AuditLog(Redactor())

    async def note(text: str, fail: bool = False) -> None:
        async with db.transaction() as session:
            await audit.record(session, "test", note=text)
            if fail:
                raise RuntimeError("the step failed")

    try:
        for i in range(5):
            await note(f"kept {i}")
        assert len(checkouts) == 1
        with pytest.raises(RuntimeError):
            await note("rolled back", fail=True)
        await note("after the failure")
        assert len(checkouts) == 2
        assert await audit.chain(db) == 6
        async with db.transaction(read=True) as session:
            notes = (await session.execute(sa.select(AuditEvent.data).where(AuditEvent.kind == "test"))).scalars().all()
        assert [n["note"] for n in notes] == [*(f"kept {i}" for i in range(5)), "after the failure"]
    finally:
        await db.dispose()


async def test_timestamps_come_back_timezone_aware(db_url):
    upgrade(db_url)
    db = Database(db_url)
    try:
        audit = AuditLog(Redactor())
        async with db.transaction() as session:
            await audit.record(session, "test", note="hi")
        assert await audit.chain(db) == 1
        async with db.transaction() as session:
            row = (await session.execute(sa.select(AuditEvent).where(AuditEvent.kind == "test"))).scalars().one()
        assert row.at.tzinfo is not None and row.at.utcoffset().total_seconds() == 0
    finally:
        await db.dispose()


async def test_concurrent_audit_writers_never_fork_the_chain(db_url):
    upgrade(db_url)
    dbs = [Database(db_url) for _ in range(4)]  # four engines = four independent writers
    audit = AuditLog(Redactor())

    async def writer(db: Database, n: int) -> None:
        for i in range(40):
            async with db.transaction() as session:
                await audit.record(session, "test", writer=n, i=i)

    async def chainer(db: Database) -> None:  # every writer also chains, as each replica does
        for _ in range(20):
            await audit.chain(db)
            await asyncio.sleep(0)

    try:
        await asyncio.gather(*(writer(db, n) for n, db in enumerate(dbs)), *(chainer(db) for db in dbs))
        for db in dbs:
            await audit.chain(db)
        async with dbs[0].transaction() as session:
            rows = (await session.execute(sa.select(AuditEvent).order_by(AuditEvent.seq))).scalars().all()
        assert len(rows) == 1 + 160  # the chain's first row names its key (`audit_keyed`)
        assert len({r.prev_hash for r in rows}) == 1 + 160  # each link used exactly once: no fork
        assert verify_chain(rows, audit.keys_for(db_url)) is None
    finally:
        for db in dbs:
            await db.dispose()


def test_separate_processes_share_the_audit_chain(sqlite_url):
    upgrade(sqlite_url)
    script = (
        "import asyncio,sys\n"
        "from storage.engine import Database\nfrom storage.audit import AuditLog\nfrom storage.redact import Redactor\n"
        "async def main():\n"
        "    db = Database(sys.argv[1])\n"
        "    for i in range(25):\n"
        "        async with db.transaction() as s:\n"
        "            await AuditLog(Redactor()).record(s, 'proc', i=i)\n"
        "        await AuditLog(Redactor()).chain(db)\n"
        "    await db.dispose()\n"
        "asyncio.run(main())\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, sqlite_url]) for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    engine = make_sync_engine(normalise_url(sqlite_url))
    with sa.orm.Session(engine) as session:
        rows = session.execute(sa.select(AuditEvent).order_by(AuditEvent.seq)).scalars().all()
    keys = load_keys(None, default_key_file(sqlite_url), create=False)  # the processes shared one key file
    assert len(rows) == 1 + 100 and verify_chain(rows, keys) is None  # `audit_keyed` first


async def test_two_replicas_on_one_database_run_a_clicked_write_once(bots, db_url, model):
    """Replica A posts the card; the same click reaches A and B at once; exactly one execution."""
    ledger = Ledger()
    model.responder = lambda body: (
        text("done")
        if body["messages"][-1]["role"] == "tool"
        else calls(("write_note", {"topic": last_user_text(body), "text": "x"}))
    )
    replicas = []
    for _ in range(2):
        app = await bots.start(toolsets=[notes_toolset(ledger)], database_url=db_url)
        await bots.run(app)
        replicas.append(app)
    a, b = replicas
    alice = User("terminal", "alice", "local", "alice")
    for i in range(5):
        await a.core.accept_message(IncomingMessage(alice, f"t{i}", Thread("terminal", {}), f"conv-{i}", (f"k{i}",)))
    await a.ctx.tasks.idle()
    async with a.ctx.db.transaction() as session:
        ids = (await session.execute(sa.select(Approval.id).where(Approval.status == "pending"))).scalars().all()
    assert len(ids) == 5
    outcomes = await asyncio.gather(
        *[app.core.decide(DecisionRequest(approval_id, alice, approve=True)) for approval_id in ids for app in (a, b, a, b)]
    )
    await asyncio.gather(a.ctx.tasks.idle(), b.ctx.tasks.idle())
    assert sum(o.kind == "approved" for o in outcomes) == 5
    assert sorted(e["approval_id"] for e in ledger.effects) == sorted(ids)


async def test_a_duplicate_delivery_is_recorded_once_across_replicas(bots, db_url, model):
    model.responder = lambda body: text("hi")
    a = await bots.start(database_url=db_url)
    b = await bots.start(database_url=db_url)
    msg = IncomingMessage(User("slack", "U1", "T1"), "hello", Thread("terminal", {}), "c1", ("slack:evt:Ev1", "slack:msg:C1:1.0"))
    same_message_other_event = IncomingMessage(msg.user, "hello", msg.thread, "c1", ("slack:evt:Ev2", "slack:msg:C1:1.0"))
    results = await asyncio.gather(
        a.core.accept_message(msg), b.core.accept_message(msg), b.core.accept_message(same_message_other_event)
    )
    assert sorted(results) == [False, False, True]
    await asyncio.gather(a.ctx.tasks.idle(), b.ctx.tasks.idle())
    assert len(model.requests) == 1


def test_the_database_url_password_never_reaches_an_error(tmp_path):
    from bot.app import build_app
    from bot.core.errors import StorageError
    from tests.conftest import make_settings

    settings = make_settings("http://127.0.0.1:9/v1", "postgresql://bob:s3cr3t-pass@127.0.0.1:1/nodb")
    with pytest.raises(StorageError) as info:
        asyncio.run(build_app(settings))
    assert "s3cr3t-pass" not in str(info.value) and "DATABASE_URL" in str(info.value)
    assert re.search(r"cannot open or migrate", str(info.value))
