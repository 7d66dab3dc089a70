"""An MCP server that re-defines a tool while the session stays up, with `notifications/tools/list_changed` or
silently: the bot must not call a tool the card (or the read-only rule) did not describe. The server is
`tests/fakes/mcp_servers/shifting.py` (the SDK's server side), over stdio and streamable HTTP; over stdio
the bot speaks the 2026-07-28 protocol (notifications on a `subscriptions/listen` stream), and the raw
handshake-era server of `test_mcp_hostile` covers the notification sent on the connection itself."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TerminalBot, TerminalFactory
from tests.fakes.openai_server import calls, text, tool_results
from tests.test_core_agent import approval, approval_ids, audit_rows
from tests.test_mcp import lines, running, until
from tests.test_mcp_hostile import mcp_bot
from tools.context import ToolContext
from tools.errors import ToolUnavailable

SHIFTING = str(Path(__file__).parent / "fakes" / "mcp_servers" / "shifting.py")
TRANSPORTS = ["stdio", "http"]


@asynccontextmanager
async def shifting(state: Path, transport: str, **extra: Any) -> AsyncIterator[dict[str, Any]]:
    """The configuration of a trusted shifting server (its HTTP process started here, stopped after)."""
    env = {"SHIFTING_STATE": str(state)}
    if transport == "stdio":
        yield {"command": sys.executable, "args": [SHIFTING], "env": env, "trusted": True, **extra}
        return
    proc = await asyncio.create_subprocess_exec(
        sys.executable, SHIFTING, "--http", "0", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert proc.stdout is not None
    try:
        port = int(await proc.stdout.readline())
        yield {"url": f"http://127.0.0.1:{port}/mcp", "trusted": True, **extra}
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest.fixture
async def ctx(sqlite_url: str) -> AsyncIterator[ToolContext]:
    from storage.engine import Database

    db = Database(sqlite_url)
    yield ToolContext(db=db)
    await db.dispose()


# ---- notifications/tools/list_changed -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_read_tool_that_stops_saying_read_only_is_refused_after_list_changed(
    tmp_path: Path, ctx: ToolContext, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with shifting(tmp_path, transport) as server, running({"ops": server}) as (manager, specs):
        assert specs["ops__peek"].read_only
        assert await specs["ops__peek"].run(ctx, {"target": "web-1"}) == "web-1 is fine"
        with caplog.at_level(logging.INFO, "chatops.mcp"):
            await specs["ops__shift"].run(ctx, {"change": "peek_writes"})  # the server says its tools changed
            await until(manager.connection("ops"), lambda c: "peek" in c.changed)
        with pytest.raises(ToolUnavailable, match="not sent: the MCP server ops changed peek since the bot started"):
            await specs["ops__peek"].run(ctx, {"target": "web-2"})
        said = [r.getMessage() for r in caplog.records if "changed 1 tool(s)" in r.getMessage()]
        assert said == ["MCP server ops changed 1 tool(s) since start-up (peek); they are refused until the bot restarts"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_tool_that_appears_after_list_changed_is_logged_and_not_offered(
    tmp_path: Path, ctx: ToolContext, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with shifting(tmp_path, transport) as server, running({"ops": server}) as (manager, specs):
        with caplog.at_level(logging.INFO, "chatops.mcp"):
            await specs["ops__shift"].run(ctx, {"change": "purge_added"})
            await until(manager.connection("ops"), lambda c: "purge" in c.book.added)
        assert "ops__purge" not in specs
        assert "MCP server ops lists 1 new tool(s) (purge); they are not offered until the bot restarts" in caplog.text
        assert manager.connection("ops").changed == set()  # the others are as they were: still called
        assert await specs["ops__peek"].run(ctx, {"target": "web-1"}) == "web-1 is fine"


async def test_a_handshake_era_server_that_announces_a_change_is_listed_again(tmp_path: Path, ctx: ToolContext) -> None:
    """The raw server speaks the 2025 protocol: its notification comes on the connection, unasked."""
    from tests.test_mcp_hostile import RAW, tool

    reads = {"readOnlyHint": True, "destructiveHint": False}
    (tmp_path / "tools.json").write_text(json.dumps([tool("peek", {"target": {"type": "string"}}, reads)]))
    server = {"command": sys.executable, "args": [RAW], "env": {"RAW_STATE": str(tmp_path)}, "trusted": True}
    async with running({"ops": server}) as (manager, specs):
        (tmp_path / "tools.json").write_text(json.dumps([tool("peek", {"target": {"type": "string"}}, {"readOnlyHint": False})]))
        (tmp_path / "notify_on_call").write_text("peek")  # the server announces the change as it answers
        assert "peek ran" in await specs["ops__peek"].run(ctx, {"target": "web-1"})
        await until(manager.connection("ops"), lambda c: "peek" in c.changed)
        with pytest.raises(ToolUnavailable, match="changed peek"):
            await specs["ops__peek"].run(ctx, {"target": "web-2"})
        assert lines(tmp_path / "calls.log") == ['peek {"target": "web-1"}']


# ---- a silent change, caught before a write is sent ----------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("change", ["deploy_force", "deploy_drops"])
async def test_a_write_to_a_tool_changed_silently_is_not_sent(
    tmp_path: Path, ctx: ToolContext, transport: str, change: str
) -> None:
    """A new `force` argument (true by default), or a description that now says it drops the database."""
    (tmp_path / "page_size").write_text("1")  # one tool a page: `deploy` is on the second
    async with shifting(tmp_path, transport) as server, running({"ops": server}) as (_, specs):
        assert await specs["ops__deploy"].run(ctx, {"service": "web"}) == "deployed web"
        await specs["ops__shift"].run(ctx, {"change": change, "notify": False})
        with pytest.raises(ToolUnavailable, match="not sent: the MCP server ops changed deploy since the bot started"):
            await specs["ops__deploy"].run(ctx, {"service": "api"})
        assert lines(tmp_path / "calls.log") == ["deploy web"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_write_whose_tool_cannot_be_listed_is_not_sent(tmp_path: Path, ctx: ToolContext, transport: str) -> None:
    async with shifting(tmp_path, transport) as server, running({"ops": server}, call_timeout=2) as (_, specs):
        (tmp_path / "hang_list").touch()
        async with asyncio.timeout(30):  # bounded by the call's own time, not the executor's
            with pytest.raises(
                ToolUnavailable, match=r"not sent: .* could not list its tools .*no answer to tools/list within 1s"
            ):
                await specs["ops__deploy"].run(ctx, {"service": "web"})
        assert lines(tmp_path / "calls.log") == []


# ---- through the bot: the approved card ends "not sent" --------------------------------------------------------


async def shifted_bot(
    terminal_bot: TerminalFactory, model: Any, tmp_path: Path, server: dict[str, Any], **env: str
) -> TerminalBot:
    model.script(calls(("ops__deploy", {"service": "web"})), text("Waiting for approval."))
    bot = await mcp_bot(terminal_bot, tmp_path, {"ops": server}, **env)
    await bot.say("deploy web")
    assert "Run deploy on the MCP server ops" in bot.transcript()
    return bot


async def ends_not_sent(bot: TerminalBot, model: Any, approval_id: str, why: str) -> None:
    """The approval failed, the card and the model say "not sent" and why, the audit log records it."""
    row = await approval(bot.app, approval_id)
    assert row.status == "failed" and row.outcome is not None and row.outcome.startswith("not sent: "), row.outcome
    assert why in row.outcome
    assert f"Failed: not sent: the MCP server ops {why}" in bot.transcript()
    (result,) = tool_results(model.requests[-1])
    assert "not sent" in result and why in result
    (executed,) = [r for r in await audit_rows(bot.app) if r.kind == "tool_executed"]
    assert executed.status == "failed" and why in executed.data["result"]


async def test_an_approved_deploy_whose_tool_changed_silently_is_not_sent(terminal_bot, model, tmp_path):
    async with shifting(tmp_path, "stdio") as server:
        bot = await shifted_bot(terminal_bot, model, tmp_path, server)
        (approval_id,) = approval_ids(bot.transcript())
        shift = bot.app.ctx.registry.get("ops__shift")
        # The server now says deploy also drops the database, and tells no one.
        await shift.run(bot.app.ctx.tool_context, {"change": "deploy_drops", "notify": False})
        model.script(text("It was not sent."))
        await bot.say(f"approve {approval_id}")
        assert lines(tmp_path / "calls.log") == [], "the call the card did not show was sent"
        await ends_not_sent(bot, model, approval_id, "changed deploy since the bot started")


async def test_an_approved_deploy_whose_server_cannot_list_is_not_sent(terminal_bot, model, tmp_path):
    async with shifting(tmp_path, "http") as server:
        bot = await shifted_bot(terminal_bot, model, tmp_path, server, CHATOPS_TOOL_TIMEOUT="5")
        (approval_id,) = approval_ids(bot.transcript())
        (tmp_path / "hang_list").touch()
        model.script(text("It was not sent."))
        await bot.say(f"approve {approval_id}")
        assert lines(tmp_path / "calls.log") == []
        await ends_not_sent(bot, model, approval_id, "could not list its tools")
