"""Findings of the SQLite chaos campaign (`benchmarks/chaos_sqlite.py`), each reduced to one test:
`chatops serve --workers N` as real processes, faults from another process."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from bot.app import Role, build_app
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
