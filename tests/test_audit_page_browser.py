"""The audit page in headless Chromium (Debian's `chromium`, driven by Playwright): the list, the
filters, a run's timeline, the verification badge before and after tampering, a download, and a
screenshot kept under tests/artifacts/ and checked."""

from __future__ import annotations

import csv
import io
import os
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.audit_page_helpers import HOSTILE_ACTOR, FilledLog, audit_page, fill_log, tamper

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
VIEWPORT = {"width": 1280, "height": 860}


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    if not Path(CHROMIUM).exists():
        message = "Debian's chromium is not installed (apt-get install chromium; .ci/run does it)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--disable-gpu"])
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def filled(terminal_bot, model, sqlite_url) -> FilledLog:
    return await fill_log(terminal_bot, model, sqlite_url, noise=4)


async def open_page(browser, base: str):
    context = await browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = await context.new_page()
    await page.goto(base)
    return context, page


async def test_list_filter_and_timeline(browser, filled):
    async with audit_page(filled.url) as client:
        context, page = await open_page(browser, str(client.make_url("/")))
        rows = page.locator("#log tbody tr")
        assert await rows.count() == min(filled.rows, 50)
        assert await page.locator("#count").inner_text() == f"{filled.rows} matching rows"
        assert await page.title() == "Audit log · chatops"  # the hostile rows did not run
        assert await page.get_by_text(HOSTILE_ACTOR).count() == 1  # shown as text

        await page.select_option("select[name=status]", "approved")
        await page.click("#apply")
        await page.wait_for_url("**status=approved**")
        assert await rows.count() == 1 and await page.locator("#count").inner_text() == "1 matching row"
        await page.click("#reset")
        await page.fill("input[name=actor]", "robot1")
        await page.fill("input[name=since]", "1h")
        await page.click("#apply")
        await page.wait_for_url("**actor=robot1**")
        assert await page.locator("#count").inner_text() == "1 matching row"
        await page.fill("input[name=since]", "yesterday-ish")
        await page.click("#apply")
        assert "yesterday-ish" in await page.locator("#problem").inner_text()

        await page.goto(str(client.make_url("/")))
        await page.locator(f'a.run-link[href="/run/{filled.run_id}"]').first.click()
        await page.wait_for_url(f"**/run/{filled.run_id}")
        phases = await page.locator("#timeline li").evaluate_all("items => items.map(i => i.dataset.phase)")
        assert [p for i, p in enumerate(phases) if p not in phases[:i]] == [
            "request",
            "model",
            "card",
            "decision",
            "execution",
            "reply",
        ]
        assert await page.locator("#requester").inner_text() == "terminal:local:alice"
        await context.close()


async def test_verification_badge_intact_then_broken_with_screenshot(browser, filled):
    async with audit_page(filled.url) as client:
        context, page = await open_page(browser, str(client.make_url("/")))
        badge = page.locator("#chain-status .badge")
        assert await badge.get_attribute("data-state") == "unverified"
        assert await badge.inner_text() == "chain not verified"
        await page.click("#verify")
        await page.wait_for_selector('#chain-status .badge[data-state="intact"]')
        assert await badge.inner_text() == "chain intact"
        await save_screenshot(page, "audit-page-intact.png")

        tamper(filled.url, 5)
        await page.click("#verify")
        await page.wait_for_selector('#chain-status .badge[data-state="broken"]')
        assert await badge.inner_text() == "chain broken at seq 5"
        assert await page.locator('tr.bad[data-seq="5"]').count() == 1  # the bad row is marked in the list
        await page.goto(str(client.make_url(f"/run/{filled.run_id}")))
        assert await badge.inner_text() == "chain broken at seq 5"
        await save_screenshot(page, "audit-page-timeline.png")
        await context.close()


async def test_verify_now_from_a_page_behind_a_token(browser, filled):
    """The button is the page's own form: with a token (the cookie) it verifies, and the browser
    says the POST came from the page itself (under `Referrer-Policy: no-referrer` it would have
    sent `Origin: null`, and the page would refuse its own form)."""
    token = "audit-page-token-browser-0123456789"
    async with audit_page(filled.url, token=token) as client:
        context, page = await open_page(browser, str(client.make_url("/")) + f"?token={token}&kind=model_call")
        posted: list[dict[str, str]] = []
        page.on("request", lambda request: posted.append(request.headers) if request.method == "POST" else None)
        await page.click("#verify")
        await page.wait_for_selector('#chain-status .badge[data-state="intact"]')
        assert page.url == str(client.make_url("/")) + "?kind=model_call"  # back where the button was
        assert "verified" in await page.locator(".badge-detail").inner_text()
        await context.close()
        origin = f"http://127.0.0.1:{client.port}"
    (headers,) = posted
    assert headers["origin"] == origin, headers


async def test_download_of_the_filtered_rows(browser, filled):
    async with audit_page(filled.url) as client:
        context, page = await open_page(browser, str(client.make_url("/?kind=model_call")))
        async with page.expect_download() as info:
            await page.click("#download-csv")
        download = await info.value
        assert download.suggested_filename.startswith("chatops-audit-") and download.suggested_filename.endswith(".csv")
        rows = list(csv.DictReader(io.StringIO(Path(await download.path()).read_text(encoding="utf-8"))))
        assert rows and {r["kind"] for r in rows} == {"model_call"}
        async with page.expect_download() as info:
            await page.click("#download-jsonl")
        lines = Path(await (await info.value).path()).read_text(encoding="utf-8").splitlines()
        assert len(lines) == len(rows)
        await context.close()


async def save_screenshot(page, name: str) -> Path:
    """Full-width screenshot under tests/artifacts/, checked to be a real PNG of the viewport's size."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (VIEWPORT["width"], VIEWPORT["height"])
    assert len(data) > 20_000  # a rendered page, not a blank image
    return path
