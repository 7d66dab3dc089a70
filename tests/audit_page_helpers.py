"""Audit page test helpers: a real audit log (a real run through the terminal bot plus hostile
rows recorded through `AuditLog`) and the page served on 127.0.0.1 by aiohttp's test server."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from bot.auditweb.reader import make_read_engine
from bot.auditweb.serve import ACCESS_LOG
from bot.auditweb.server import make_app
from storage.audit import AuditLog
from storage.audit_keys import default_key_file, load_keys
from storage.engine import Database, make_sync_engine, normalise_url
from storage.models import AuditEvent
from storage.redact import Redactor
from tests.conftest import SUITE_LOG_REDACTOR, TerminalFactory
from tests.fakes.openai_server import ScriptedModel, calls, text
from tests.support_tools import Ledger, notes_toolset

HOSTILE_ACTOR = "<script>document.title='pwned'</script>"
HOSTILE_TEXT = "<img src=x onerror=\"document.title='pwned'\">"


@dataclass(frozen=True)
class FilledLog:
    """What the log holds: one approved run, one refused run, hostile rows."""

    url: str
    run_id: str
    approval_id: str
    rejected_run_id: str
    rows: int


async def fill_log(terminal_bot: TerminalFactory, model: ScriptedModel, url: str, *, noise: int = 0, **env: str) -> FilledLog:
    """A real conversation (a write approved and executed, another rejected), `noise` extra rows,
    and rows whose actor and data are HTML/script, all chained."""
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "launch", "text": "Ship 张三's order"})), text("The note is stored."))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)], database_url=url, **env)
    await bot.say("please store a note about the launch")
    approval_id = re.findall(r"approve (ap-[a-z0-9]+)", bot.transcript())[-1]
    await bot.say(f"approve {approval_id}")
    model.script(calls(("write_note", {"topic": "secret-plans", "text": "nope"})), text("Understood, not stored."))
    await bot.say("store a note about secret plans")
    rejected = re.findall(r"reject (ap-[a-z0-9]+)", bot.transcript())[-1]
    await bot.say(f"reject {rejected}")
    audit, db = bot.app.ctx.audit, bot.app.ctx.db
    for i in range(noise):
        async with db.transaction() as session:
            await audit.record(session, "heartbeat_note", actor=f"terminal:local:robot{i % 3}", status="ok", i=i)
    await record_hostile_rows(url)
    await audit.chain(db)
    engine = make_sync_engine(normalise_url(url))
    with engine.connect() as conn:
        run_id = conn.execute(sa.select(AuditEvent.run_id).where(AuditEvent.approval_id == approval_id)).scalars().first()
        rejected_run = conn.execute(sa.select(AuditEvent.run_id).where(AuditEvent.approval_id == rejected)).scalars().first()
        count = conn.execute(sa.select(sa.func.count()).select_from(AuditEvent)).scalar_one()
    engine.dispose()
    assert run_id and rejected_run
    return FilledLog(url, run_id, approval_id, rejected_run, count)


async def record_hostile_rows(url: str) -> None:
    db = Database(url)
    audit = AuditLog(Redactor())
    try:
        async with db.transaction() as session:
            await audit.record(
                session, "request_received", actor=HOSTILE_ACTOR, platform="slack", status="queued", text=HOSTILE_TEXT
            )
            await audit.record(
                session,
                "click_refused",
                actor="slack:T1:U0EVE",
                tool="</td><b>tool",
                status="not_allowed",
                reason="a 100% _literal_ reason",
            )
        await audit.chain(db)
    finally:
        await db.dispose()


def tamper(url: str, seq: int) -> None:
    """Change a chained row behind the log's back, as an attacker with database access would."""
    engine = make_sync_engine(normalise_url(url))
    with engine.begin() as conn:
        conn.execute(sa.update(AuditEvent).where(AuditEvent.seq == seq).values(actor="terminal:local:mallory"))
    engine.dispose()


@asynccontextmanager
async def audit_page(url: str, token: str | None = None) -> AsyncIterator[TestClient]:
    """The page on a real 127.0.0.1 port, with an aiohttp client pointed at it."""
    if token:
        SUITE_LOG_REDACTOR.add([token])  # the suite's DEBUG log is checked for it afterwards
    engine = make_read_engine(url)
    keys = load_keys(None, default_key_file(url), create=False)  # the ring the bots that wrote the log used
    server = TestServer(make_app(engine, token, keys), host="127.0.0.1")
    await server.start_server(**ACCESS_LOG)  # as `chatops audit serve` logs access
    client = TestClient(server)
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        engine.dispose()


async def form_token(client: TestClient, path: str = "/") -> str:
    """The "Verify now" form's token on the page at `path`, as a browser would find it."""
    html = await (await client.get(path)).text()
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[-500:]
    return found[1]


async def post_verify(
    client: TestClient, token: str | None = None, next_: str = "/", headers: dict[str, str] | None = None
) -> ClientResponse:
    """Click "Verify now": post the page's form (with the token of a page just read, unless given)."""
    token = await form_token(client) if token is None else token
    data = {"next": next_, "csrf": token}
    return await client.post("/verify", data=data, headers=headers or {}, allow_redirects=False)
