"""Findings of the SQLite chaos campaign (`benchmarks/chaos_sqlite.py`), each reduced to one test:
`chatops serve --workers N` as real processes, faults from another process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import sqlalchemy as sa

from bot.app import Role, build_app
from bot.cli_workers import unstick_acks
from bot.health import database_problem
from bot.supervisor import Workers
from storage.engine import Database
from storage.migrate import upgrade
from storage.sessions import DbSession
from tests.conftest import make_settings
from tests.fakes.openai_server import ScriptedModel, text
from tests.fakes.slack_api import FakeSlackApi
from tests.fault_helpers import LockHolder
from tests.slack_helpers import mention
from tests.test_workers import smtp, start_bot

__all__ = ["smtp"]


async def test_a_start_while_another_process_holds_the_write_lock_waits_for_it_then_serves(tmp_path, smtp):
    """Campaign: `chatops serve` killed and started again while another process held SQLite's write
    lock for 1-20 s exited at once ("cannot open or migrate the database (database is locked)") after
    the migration's 5 s busy wait, so nothing served until someone started it again."""
    path = tmp_path / "bot.db"
    url = f"sqlite:///{path}"
    await asyncio.to_thread(upgrade, url)  # the database an earlier start made
    holder = LockHolder(str(path))
    await holder.hold()
    try:
        async with ScriptedModel(responder=lambda _: text("hello back")) as model, FakeSlackApi() as fake:
            bot = await start_bot(tmp_path, url, model.url, fake, smtp, workers=1, ready=False)
            await bot.serving.wait_line(r"the database is locked by another process: waiting for it")
            await holder.release()
            await bot.ready()
            await bot.send(mention("hello"))
            await bot.answered("hello back")
            await bot.stop()
    finally:
        holder.kill()


async def keyed_rows(session: DbSession) -> int:
    return int((await session.execute(sa.text("SELECT count(*) FROM audit_event WHERE kind = 'audit_keyed'"))).scalar_one())


async def test_a_front_whose_first_audit_chaining_meets_a_held_lock_tries_again_and_starts(model, sqlite_url):
    """Campaign: a `chatops serve` started again while another process took the SQLite file, just
    after its migration, stopped at once ("the database cannot be used (database is locked)"): the
    start's first audit chaining (it keys an empty chain) was the one database step not retried."""
    app = await build_app(make_settings(model.url, sqlite_url), role=Role.FRONT, wake=lambda: None)
    retried = asyncio.Event()
    app.ctx.db.on_retry(lambda _: retried.set())
    holder = LockHolder(sqlite_url.removeprefix("sqlite:///"))
    await holder.hold()
    try:
        starting = asyncio.create_task(app.start(serve_http=False))
        await asyncio.wait([starting, asyncio.create_task(retried.wait())], return_when=asyncio.FIRST_COMPLETED)
        assert not starting.done(), starting.exception()
        await holder.release()
        await asyncio.wait_for(starting, 60)
        assert await app.ctx.db.run(keyed_rows, read=True) == 1
    finally:
        holder.kill()
        await app.stop()


async def test_readiness_holds_while_another_process_holds_the_write_lock(sqlite_url):
    """Campaign: `chatops serve` started again while another process held SQLite's write lock said
    "not ready yet: the database cannot be queried (OperationalError)": `/readyz`'s `SELECT 1` began
    with `BEGIN IMMEDIATE`, so it waited for the write lock (and took it from the acks) instead of
    reading beside it; a load balancer would have taken a working replica out."""
    await asyncio.to_thread(upgrade, sqlite_url)
    db = Database(sqlite_url)
    holder = LockHolder(sqlite_url.removeprefix("sqlite:///"))
    try:
        assert await database_problem(db) is None
        await holder.hold()
        assert await database_problem(db) is None
    finally:
        holder.kill()
        await db.dispose()


# A worker that takes SQLite's write lock, says it is ready, and keeps the lock (a worker stopped
# inside a transaction). Its arguments: the database path, then the supervisor's (`--ready-fd N` last).
LOCKING_WORKER = """
import os, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN IMMEDIATE")
db.execute("INSERT INTO seen_key (key, inbox_id, created_at) VALUES ('held', 'held', '2026-01-01')")
os.write(int(sys.argv[-1]), b"r")
time.sleep(120)
"""


async def noted(session: DbSession) -> None:
    await session.execute(sa.text("INSERT INTO seen_key (key, inbox_id, created_at) VALUES ('ack', 'ack', '2026-01-01')"))


async def test_an_ack_meeting_the_write_lock_of_a_stopped_worker_has_that_worker_killed(sqlite_url):
    """Campaign: a worker SIGSTOPped inside a write transaction kept SQLite's write lock for its whole
    stop (8.9 s in one run), and the front answered 503 to every event meanwhile (15 refusals no
    outside process explains). Now the front's ack, having waited a moment, finds the lock's holder
    (`F_GETLK` on the WAL index), sees one of its workers stopped, kills it (the supervisor restarts it),
    and records within its budget."""
    await asyncio.to_thread(upgrade, sqlite_url)
    path = sqlite_url.removeprefix("sqlite:///")
    front = Database(sqlite_url, checkpoints=False)
    workers = Workers(1, [path], command=[sys.executable, "-c", LOCKING_WORKER])
    unstick_acks(front, workers)
    try:
        await workers.start()
        assert await workers.first_ready(30)
        stuck = workers.procs[0]
        os.kill(stuck.pid, signal.SIGSTOP)
        await front.run(noted, urgent=True)  # LockBusy (a 503) while the stopped worker keeps the lock
        assert await asyncio.wait_for(stuck.wait(), 10) == -signal.SIGKILL
    finally:
        await workers.stop(5)
        await front.dispose()
