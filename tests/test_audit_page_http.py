"""The audit page over plain HTTP (aiohttp client): escaping, the token, 404s, filters, pagination,
downloads, read-only access on SQLite and PostgreSQL, and `chatops audit serve` as a process."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy as sa

from bot.auditweb.reader import make_read_engine
from bot.auditweb.serve import check_exposure
from bot.core.errors import ChatopsError
from storage.audit import AuditLog, entry
from storage.engine import Database, make_sync_engine, normalise_url
from storage.redact import Redactor
from tests.audit_page_helpers import HOSTILE_ACTOR, HOSTILE_TEXT, audit_page, fill_log, form_token, post_verify, tamper
from tests.test_cli import CHATOPS

TOKEN = "audit-page-token-0123456789"


@pytest.fixture
async def filled(db_url, terminal_bot, model):  # the database first: it outlives the bot
    return await fill_log(terminal_bot, model, db_url)


async def test_the_log_lists_rows_and_hostile_text_stays_text(filled):
    async with audit_page(filled.url) as client:
        response = await client.get("/")
        html = await response.text()
    assert response.status == 200 and response.content_type == "text/html"
    assert f"{filled.rows} matching rows" in html
    assert "<script>document" not in html and "<img src=x" not in html
    assert "&lt;script&gt;document.title=" in html and "&lt;img src=x onerror=" in html
    assert "&lt;/td&gt;&lt;b&gt;tool" in html  # a tool name cannot close the table cell either
    assert "script-src" not in response.headers["Content-Security-Policy"]  # no script may run at all
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert filled.run_id in html and f'href="/run/{filled.run_id}"' in html


async def test_filters_search_and_bad_input(filled):
    async with audit_page(filled.url) as client:
        approved = await (await client.get("/", params={"status": "approved"})).text()
        by_kind = await (await client.get("/", params={"kind": "click_refused", "actor": "u0eve"})).text()
        literal = await (await client.get("/", params={"q": "100%"})).text()
        percent = await (await client.get("/", params={"q": "write%note"})).text()
        underscore = await (await client.get("/", params={"q": "write_not_"})).text()
        chinese = await (await client.get("/", params={"q": "张三"})).text()
        future = await (await client.get("/", params={"since": "2999-01-01"})).text()
        bad = await client.get("/", params={"since": "last tuesday"})
        bad_html = await bad.text()
        bad_page = await client.get("/", params={"before": "x"})
        bad_page_html = await bad_page.text()
    assert "1 matching row" in approved and filled.approval_id in approved
    assert "1 matching row" in by_kind and "slack:T1:U0EVE" in by_kind
    assert "1 matching row" in literal  # % is matched literally, not as a wildcard
    assert "0 matching rows" in percent and "0 matching rows" in underscore  # not wildcards: nothing is named like that
    assert "matching row" in chinese and "0 matching rows" not in chinese  # non-ASCII text in the data is found
    assert "0 matching rows" in future and "No audit rows match these filters" in future
    assert bad.status == 400 and "last tuesday" in bad_html and "is neither a duration" in bad_html
    assert bad_page.status == 400 and "is not a row number" in bad_page_html


async def test_pagination_walks_the_whole_log_both_ways(terminal_bot, model, sqlite_url):
    filled = await fill_log(terminal_bot, model, sqlite_url, noise=23)
    seen: list[int] = []
    async with audit_page(filled.url) as client:
        url = "/?size=10"
        pages = []
        while url:
            html = await (await client.get(url)).text()
            pages.append(html)
            seen += [int(s) for s in _seqs(html)]
            url = _link(html, "older")
        assert seen == list(range(filled.rows, 0, -1))  # newest first, every row exactly once
        back = _link(pages[-1], "newer")
        assert back is not None
        html = await (await client.get(back)).text()
        assert _seqs(html) == _seqs(pages[-2])
        assert _link(pages[0], "newer") is None and _link(pages[0], "newest") is None


def _seqs(html: str) -> list[str]:
    return re.findall(r'data-seq="(\d+)"', html)


def _link(html: str, name: str) -> str | None:
    found = re.search(rf'id="{name}" href="([^"]+)"', html)
    return found[1].replace("&amp;", "&") if found else None


async def test_the_timeline_and_404s(filled):
    async with audit_page(filled.url) as client:
        by_run, by_approval = await client.get(f"/run/{filled.run_id}"), await client.get(f"/run/{filled.approval_id}")
        html, approval_html = await by_run.text(), await by_approval.text()
        unknown = await client.get("/run/run-doesnotexist")
        unknown_html = await unknown.text()
        weird = await client.get("/run/%3Cscript%3E")
        weird_html = await weird.text()
        nowhere = await client.get("/no/such/page")
        nowhere_html = await nowhere.text()
        static_escape = await client.get("/static/../reader.py")
        post = await client.post("/", data={"q": "x"})
    assert by_run.status == 200 and by_approval.status == 200 and f"Run <code>{filled.run_id}</code>" in approval_html
    phases = [p for p in ("request", "model", "card", "decision", "execution", "reply") if f'data-phase="{p}"' in html]
    assert phases == ["request", "model", "card", "decision", "execution", "reply"]
    kinds = ("request_received", "approval_requested", "approval_decided", "tool_executed", "reply_posted")
    order = [html.index(f'data-kind="{k}"') for k in kinds]
    assert order == sorted(order)
    assert "Ship 张三&#39;s order" in html  # the frozen arguments, escaped, in the proposal's details
    assert unknown.status == 404 and "No audit rows for run-doesnotexist" in unknown_html
    assert weird.status == 404 and "<script>" not in weird_html
    assert nowhere.status == 404 and "Back to the audit log" in nowhere_html
    assert static_escape.status in (403, 404)
    assert post.status == 405  # read-only: nothing but GET


async def test_the_token_is_required_when_set(sqlite_url, terminal_bot, model, caplog):
    filled = await fill_log(terminal_bot, model, sqlite_url)
    caplog.set_level(logging.INFO, logger="chatops.audit")
    async with audit_page(filled.url, token=TOKEN) as client:
        anonymous = await client.get("/")
        wrong = await client.get("/", headers={"Authorization": "Bearer nope"})
        wrong_query = await client.get("/", params={"token": "nope"})
        bearer = await client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
        export = await client.get("/export.jsonl", headers={"Authorization": f"Bearer {TOKEN}"})
        anonymous_export = await client.get("/export.csv")
        first_visit = await client.get("/", params={"token": TOKEN})  # sets a cookie derived from the token
        cookie = first_visit.history[0].cookies["chatops_audit"]  # on the redirect that drops the token
        later = await client.get(f"/run/{filled.run_id}")  # the cookie jar carries it
        anonymous_html = await anonymous.text()
    assert anonymous.status == 401 and anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    assert "needs its token" in anonymous_html and filled.run_id not in anonymous_html
    assert wrong.status == 401 and wrong_query.status == 401 and anonymous_export.status == 401
    assert bearer.status == 200 and export.status == 200
    assert first_visit.status == 200 and later.status == 200
    assert TOKEN not in cookie.value and cookie["httponly"] and cookie["samesite"] == "Strict"
    assert '"GET /export.jsonl" 200' in caplog.text and '"GET /" 401' in caplog.text  # who read what...
    assert TOKEN not in caplog.text and "nope" not in caplog.text  # ...without query strings


def test_the_page_listens_beyond_this_machine_only_with_a_token():
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    check_exposure("0.0.0.0", TOKEN)
    with pytest.raises(ChatopsError, match="CHATOPS_AUDIT_TOKEN"):
        check_exposure("0.0.0.0", None)


async def test_downloads_hold_exactly_the_filtered_rows(filled):
    async with audit_page(filled.url) as client:
        jsonl = await client.get("/export.jsonl", params={"status": "approved"})
        csv_all = await client.get("/export.csv")
        nothing = await client.get("/export.csv", params={"kind": "no-such-kind"})
        bad = await client.get("/export.csv", params={"until": "soon"})
        jsonl_text, csv_text, empty_text, bad_text = (
            await jsonl.text(),
            await csv_all.text(),
            await nothing.text(),
            await bad.text(),
        )
    lines = [json.loads(line) for line in jsonl_text.splitlines()]
    assert [row["approval_id"] for row in lines] == [filled.approval_id] and lines[0]["hash"]
    assert 'filename="chatops-audit-' in jsonl.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert [int(r["seq"]) for r in rows] == list(range(1, filled.rows + 1))
    assert any(r["actor"] == HOSTILE_ACTOR and json.loads(r["data"])["text"] == HOSTILE_TEXT for r in rows)  # exported verbatim
    assert empty_text.splitlines() == [csv_text.splitlines()[0]]  # just the header
    assert bad.status == 400 and "soon" in bad_text


async def test_verification_badge_over_http(filled):
    async with audit_page(filled.url) as client:
        before = await (await client.get("/")).text()
        verified = await post_verify(client, next_="/?kind=model_call")
        after = await (await client.get("/")).text()
        tamper(filled.url, 3)
        await post_verify(client)
        broken = await (await client.get("/")).text()
        offsite = await post_verify(client, next_="//evil.example/")
    assert 'data-state="unverified"' in before and "chain not verified" in before
    assert verified.status == 303 and verified.headers["Location"] == "/?kind=model_call"
    assert 'data-state="intact"' in after and f"Rows 1–{filled.rows} verified" in after
    assert 'data-state="broken"' in broken and "chain broken at seq 3" in broken
    assert offsite.headers["Location"] == "/"


async def test_the_page_reads_while_another_process_holds_the_write_lock(sqlite_url, terminal_bot, model):
    """SQLite: the page never asks for the write lock, so a writer holding it does not stop it, and
    its own connection refuses to write."""
    filled = await fill_log(terminal_bot, model, sqlite_url)
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLD_WRITE_LOCK,
        sqlite_url.removeprefix("sqlite:///"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert (await asyncio.wait_for(holder.stdout.readline(), 30)).strip() == b"locked"  # type: ignore[union-attr]
        async with audit_page(filled.url) as client:
            response = await asyncio.wait_for(client.get("/"), 5)  # well under the 10 s busy timeout
            export = await asyncio.wait_for(client.get("/export.csv"), 5)
            await asyncio.wait_for(post_verify(client), 5)
            assert response.status == 200 and export.status == 200
            assert 'data-state="intact"' in await (await client.get("/")).text()
    finally:
        holder.stdin.close()  # type: ignore[union-attr]
        await holder.wait()
    engine = make_read_engine(sqlite_url)
    with engine.connect() as conn, pytest.raises(sa.exc.OperationalError, match=r"readonly|read-only"):
        conn.execute(sa.text("DELETE FROM audit_event"))
    engine.dispose()


HOLD_WRITE_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
connection.execute("ROLLBACK")
"""


async def test_postgres_reads_are_read_only_transactions(postgres_url, terminal_bot, model):
    filled = await fill_log(terminal_bot, model, postgres_url)
    engine = make_read_engine(filled.url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SHOW transaction_read_only")).scalar() == "on"
        with pytest.raises(sa.exc.InternalError, match="read-only transaction"):
            conn.execute(sa.text("DELETE FROM audit_event"))
    engine.dispose()


async def test_a_missing_sqlite_file_is_named_and_not_created(tmp_path):
    missing = tmp_path / "nothing-here.db"
    with pytest.raises(ChatopsError, match="there is no database at"):
        make_read_engine(f"sqlite:///{missing}")
    assert not missing.exists()


async def test_chatops_audit_serve_runs_as_a_process(sqlite_url, terminal_bot, model, tmp_path: Path):
    filled = await fill_log(terminal_bot, model, sqlite_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATOPS_", "OPENAI_", "SLACK_", "FEISHU_"))}
    env.update({"DATABASE_URL": filled.url, "CHATOPS_AUDIT_TOKEN": TOKEN})
    proc = await asyncio.create_subprocess_exec(
        *CHATOPS,
        "audit",
        "serve",
        "--port",
        "0",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()  # type: ignore[union-attr]
        assert line.startswith("audit page: http://127.0.0.1:") and "(token required)" in line
        base = line.split()[2]
        async with aiohttp.ClientSession() as http:
            async with http.get(base, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                assert response.status == 200 and filled.run_id in await response.text()
            async with http.get(base) as response:
                assert response.status == 401
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and TOKEN not in err.decode()
    refused = await asyncio.create_subprocess_exec(
        *CHATOPS,
        "audit",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        env={**env, "CHATOPS_AUDIT_TOKEN": ""},
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(refused.communicate(), 60)
    assert refused.returncode == 2 and "set CHATOPS_AUDIT_TOKEN" in err.decode()


async def test_rows_not_chained_yet_are_counted_not_chained(sqlite_url, terminal_bot, model):
    """The page does not chain (that would write): rows a stopped bot staged are only counted."""
    filled = await fill_log(terminal_bot, model, sqlite_url, CHATOPS_SWEEP_INTERVAL="3600")  # its sweeper would chain them
    db = Database(sqlite_url)
    async with db.transaction() as session:
        await AuditLog(Redactor()).record_many(session, [entry("late_row", actor="terminal:local:alice", n=i) for i in range(3)])
    await db.dispose()
    async with audit_page(filled.url) as client:
        html = await (await client.get("/")).text()
        late = await (await client.get("/", params={"kind": "late_row"})).text()
    assert "3 newer rows recorded but not chained yet" in html and f"{filled.rows} matching rows" in html
    assert "0 matching rows" in late


async def test_a_database_that_cannot_be_read_gives_a_clean_503(sqlite_url, terminal_bot, model):
    filled = await fill_log(terminal_bot, model, sqlite_url)
    async with audit_page(filled.url) as client:
        token = await form_token(client)
        engine = make_sync_engine(normalise_url(sqlite_url))
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE audit_event RENAME TO audit_event_moved"))
        responses = [await client.get(path) for path in ("/", f"/run/{filled.run_id}", "/export.csv")]
        responses.append(await post_verify(client, token))
        bodies = [await r.text() for r in responses]
        with engine.begin() as conn:  # put it back for the bot's own shutdown
            conn.execute(sa.text("ALTER TABLE audit_event_moved RENAME TO audit_event"))
        engine.dispose()
    assert [r.status for r in responses] == [503] * 4
    assert all("The audit database cannot be read right now." in b and "Traceback" not in b for b in bodies)


async def test_a_slow_download_holds_no_snapshot_between_batches(postgres_url, terminal_bot, model):
    """A client that stops reading a large download kept the page's read transaction open ("idle in
    transaction"), holding back PostgreSQL's vacuum for as long as the client liked. Each batch is now
    read in a transaction of its own, and the export is still whole and in order."""
    filled = await fill_log(terminal_bot, model, postgres_url)
    db, audit = Database(postgres_url), AuditLog(Redactor())
    try:
        async with db.transaction() as session:
            for i in range(2500):
                await audit.record(session, "heartbeat_note", actor="terminal:local:robot", status="ok", i=i, pad="x" * 5000)
        await audit.chain(db)
    finally:
        await db.dispose()
    async with audit_page(filled.url) as client:
        # A client with a small receive buffer that reads the start, then stops: the server's writes block.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", client.port or 0))
        sock.sendall(b"GET /export.jsonl HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        received = [await asyncio.to_thread(sock.recv, 65536)]
        held = await _held_while_the_client_waits(postgres_url)
        while chunk := await asyncio.to_thread(sock.recv, 1 << 20):
            received.append(chunk)
        sock.close()
    assert held == 0, "the download held a read transaction open while it waited for its client"
    head, _, body = b"".join(received).partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    lines = _unchunked(body).decode().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, filled.rows + 2501))


async def _held_while_the_client_waits(postgres_url: str, seconds: float = 2.0) -> int:
    """How many connections of the bot and the page (application_name = the test schema) sat in an open
    transaction for over half a second, looked at for `seconds` while the client does not read. (One
    look at any instant also counted a transaction of the bot's caught between two statements: CI
    failed so once.)"""
    loop = asyncio.get_running_loop()
    ends, held = loop.time() + seconds, 0
    while loop.time() < ends and not held:
        held = await asyncio.to_thread(_idle_in_transaction, postgres_url)
        await asyncio.sleep(0.1)
    return held


def _idle_in_transaction(postgres_url: str) -> int:
    name = postgres_url.rsplit("application_name=", 1)[1]
    engine = sa.create_engine(sa.make_url(postgres_url.split("?")[0]).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            query = (
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = :a AND state = 'idle in transaction'"
                " AND now() - state_change > interval '500 milliseconds'"
            )
            return int(conn.execute(sa.text(query), {"a": name}).scalar_one())
    finally:
        engine.dispose()


def _unchunked(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body's content."""
    out, rest = [], body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out)
