"""The audit page's attack findings checked in headless Chromium (Debian's `chromium`, Playwright):
a "Verify now" that lands the operator on another site, another site's page making the operator's
browser run "Verify now", a page reached under a foreign host name (DNS rebinding) whose script then
reads the whole log, and the badge after rows were deleted."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from storage.engine import make_sync_engine, normalise_url
from storage.models import AuditEvent
from tests.audit_page_helpers import FilledLog, audit_page, fill_log, form_token
from tests.test_audit_page_browser import CHROMIUM, VIEWPORT, save_screenshot

playwright_api = pytest.importorskip("playwright.async_api")
REBOUND = "rebind.evil.example"


# Chromium's own Private Network Access check stops an insecure public page from reading a loopback
# server; browsers without it (and Chromium with it switched off) leave the page to defend itself.
WITHOUT_PNA = "--disable-features=BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights,LocalNetworkAccessChecks"


async def _chromium(*extra: str) -> AsyncIterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    async with playwright_api.async_playwright() as playwright:
        # The attacker's name resolves to this machine, as after a DNS rebinding.
        args = ["--disable-gpu", f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1", *extra]
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    async for launched in _chromium():
        yield launched


@pytest.fixture
async def browser_without_pna() -> AsyncIterator[object]:
    async for launched in _chromium(WITHOUT_PNA):
        yield launched


@pytest.fixture
async def filled(terminal_bot, model, sqlite_url) -> FilledLog:
    return await fill_log(terminal_bot, model, sqlite_url)


async def test_verify_does_not_take_the_operator_to_another_site(browser, filled):
    """The form's `next` set to `/<TAB>/evil.example/login` must not become `//evil.example/login`."""
    async with audit_page(filled.url) as client:
        context = await browser.new_context(viewport=VIEWPORT)
        page = await context.new_page()
        asked: list[str] = []
        page.on("request", lambda request: asked.append(request.url))
        await page.goto(str(client.make_url("/")))
        await page.locator('#verify-form input[name="next"]').evaluate("(field) => { field.value = '/\\t/evil.example/login'; }")
        try:
            await page.click("#verify")
            await page.wait_for_selector('#chain-status .badge[data-state="intact"]')
        except playwright_api.Error as exc:  # evil.example does not resolve here: the browser went for it
            asked.append(f"failed: {exc.message.splitlines()[0]}")
        final, home = page.url, str(client.make_url("/"))
        await context.close()
    assert not [url for url in asked if "evil.example" in url.split("?")[0]], asked
    assert final.startswith(home), final


ATTACKERS_PAGE = """<h1>cute cats</h1>
<img id="img" src="{base}/verify?next=/">
<form id="form" method="post" action="{base}/verify"><input name="next" value="/"><input name="csrf" value="{token}"></form>
"""


async def test_another_site_cannot_make_the_browser_verify(browser_without_pna, filled, caplog):
    """Any page the operator visits could run "Verify now" through the operator's browser (an image,
    a background fetch, an auto-submitted form): with no token configured it needed nothing else.
    Even with a token of ours (leaked from an old page), each is refused and the badge does not move."""
    caplog.set_level(logging.INFO, logger="chatops.audit")  # the page's access log: what it answered
    async with audit_page(filled.url) as client:
        base = str(client.make_url("")).rstrip("/")
        leaked = await form_token(client)
        context = await browser_without_pna.new_context(viewport=VIEWPORT)

        async def attackers_document(route):
            await route.fulfill(status=200, content_type="text/html", body=ATTACKERS_PAGE.format(base=base, token=leaked))

        await context.route("http://evil.example/**", attackers_document)
        page = await context.new_page()
        await page.goto("http://evil.example/cats")
        await page.wait_for_function("document.getElementById('img').complete")
        fetched = await page.evaluate(
            "(url) => fetch(url, {method: 'POST', mode: 'no-cors', body: new URLSearchParams({next: '/'})}).then(() => 'sent', () => 'failed')",
            f"{base}/verify",
        )
        await page.evaluate("document.getElementById('form').submit()")
        await page.wait_for_url(f"{base}/verify")
        refused = await page.locator("#error").inner_text()
        await page.goto(f"{base}/")
        state = await page.locator("#chain-status .badge").get_attribute("data-state")
        await context.close()
    answered = re.findall(r'"(GET|POST) /verify" (\d+)', caplog.text)
    assert fetched == "sent" and sorted(answered) == [("GET", "403"), ("POST", "403"), ("POST", "403")], answered
    assert "Verification refused" in refused and "another site" in refused
    assert state == "unverified"


async def test_the_page_is_not_served_under_a_foreign_host_name(browser_without_pna, filled):
    """Without a token, a page first loaded from rebind.evil.example (the attacker's document), whose
    name then resolves to 127.0.0.1, is same-origin with the audit page: its script reads the log."""
    async with audit_page(filled.url) as client:
        origin = f"http://{REBOUND}:{client.port}"
        context = await browser_without_pna.new_context(viewport=VIEWPORT)

        async def attackers_document(route):  # what the name served before it was rebound
            await route.fulfill(status=200, content_type="text/html", body="<h1>cute cats</h1>")

        await context.route(f"{origin}/cats", attackers_document)
        page = await context.new_page()
        await page.goto(f"{origin}/cats")
        stolen = await page.evaluate("fetch('/export.jsonl').then(r => r.text())")
        shown = await page.goto(f"{origin}/")
        assert shown is not None
        assert filled.run_id not in await page.content()
        await context.close()
    assert filled.run_id not in stolen, stolen[:300]
    assert shown.status in (400, 403, 421)


async def test_the_badge_after_the_newest_rows_were_deleted(browser, filled):
    async with audit_page(filled.url) as client:
        context = await browser.new_context(viewport=VIEWPORT)
        page = await context.new_page()
        await page.goto(str(client.make_url("/")))
        await page.click("#verify")
        badge = page.locator("#chain-status .badge")
        await page.wait_for_selector('#chain-status .badge[data-state="intact"]')
        engine = make_sync_engine(normalise_url(filled.url))
        with engine.begin() as conn:
            conn.execute(sa.delete(AuditEvent).where(AuditEvent.seq > filled.rows - 3))
        engine.dispose()
        await page.reload()
        await page.wait_for_selector("#count")
        shown = await badge.get_attribute("data-state"), await page.locator(".badge-detail").inner_text()
        count = await page.locator("#count").inner_text()
        await save_screenshot(page, "audit-page-truncated.png")
        await context.close()
    assert count == f"{filled.rows - 3} matching rows"
    assert shown[0] != "intact", shown
