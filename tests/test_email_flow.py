"""send_email through the whole bot (terminal adapter, scripted model, real SMTP misbehaviour):
an approved send that cannot have reached the server ends `failed` ("not sent"); one that lost the
server's answer after the final "." ends `in_doubt`; hung sends never slow other conversations."""

from __future__ import annotations

import asyncio
import io
import re
from typing import Any

import pytest

from bot.core.events import User
from bot.terminal import TerminalAdapter
from storage.models import Approval
from tests.conftest import Bots, TerminalFactory
from tests.fakes.openai_server import Reply, ScriptedModel, calls, text
from tests.fakes.smtp_server import RawSmtp

MAIL = {"to": "ops@example.com", "subject": "Weekly report", "body": "All green."}


def smtp_env(server: RawSmtp, **extra: str) -> dict[str, str]:
    env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(server.port), "SMTP_SECURITY": "none", "SMTP_FROM": "bot@example.com"}
    return {**env, "SMTP_TIMEOUT": "1", "CHATOPS_TOOL_TIMEOUT": "10", **extra}


def mailer_model(body: dict[str, Any]) -> Reply:
    """Sends a mail when asked to, says "pong" to "ping", and reports a tool result in one line."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return text(f"Result: {last['content']}")
    return text("pong") if "ping" in last["content"] else calls(("send_email", MAIL))


def approval_ids(transcript: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"approve (ap-[a-z0-9]+)", transcript)))


async def status_of(app: Any, approval_id: str) -> Approval:
    async with app.ctx.db.transaction() as session:
        row = await session.get(Approval, approval_id)
        assert row is not None
        return row


@pytest.mark.parametrize("mode", ["no_greeting", "greet:554 5.3.2 Service not available"])
async def test_a_send_that_cannot_have_reached_the_server_fails_as_not_sent(
    terminal_bot: TerminalFactory, model: ScriptedModel, mode: str
) -> None:
    model.responder = mailer_model
    async with RawSmtp(mode) as server:
        bot = await terminal_bot(**smtp_env(server))
        await bot.say("mail the weekly report")
        (approval_id,) = approval_ids(bot.transcript())
        await bot.say(f"approve {approval_id}")
    row = await status_of(bot.app, approval_id)
    assert row.status == "failed" and row.outcome is not None and row.outcome.startswith("not sent: ")
    assert f"[{approval_id}] Failed: not sent: " in bot.transcript()
    assert "Outcome unknown" not in bot.transcript()
    assert "bot> Result: " in bot.transcript()  # the model was told, and told the user


async def test_no_answer_after_the_final_dot_is_in_doubt(terminal_bot: TerminalFactory, model: ScriptedModel) -> None:
    model.responder = mailer_model
    async with RawSmtp("hang_after_data") as server:
        bot = await terminal_bot(**smtp_env(server))
        await bot.say("mail the weekly report")
        (approval_id,) = approval_ids(bot.transcript())
        await bot.say(f"approve {approval_id}")
        assert len(server.messages) == 1
    row = await status_of(bot.app, approval_id)
    assert row.status == "in_doubt" and row.outcome is not None and "may have been delivered" in row.outcome
    assert f"[{approval_id}] Outcome unknown: " in bot.transcript()


class Watched(io.StringIO):
    """The terminal's output; `wait_for(text)` returns when a line containing `text` was written."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def write(self, s: str) -> int:
        self.changed.set()
        return super().write(s)

    async def wait_for(self, needle: str) -> None:
        while needle not in self.getvalue():
            self.changed.clear()
            await self.changed.wait()


async def test_hung_sends_never_slow_another_conversation(bots: Bots, model: ScriptedModel) -> None:
    model.responder = mailer_model
    async with RawSmtp("hang_after_data") as server:
        app = await bots.start(**smtp_env(server, SMTP_TIMEOUT="30", CHATOPS_TOOL_TIMEOUT="60"))
        out = Watched()
        alice = TerminalAdapter(app.core, out=out, user=User("terminal", "alice", "local", "alice"))
        app.ctx.channels["terminal"] = alice
        await bots.run(app)
        assert app.ctx.tool_context.smtp is not None
        hung = app.ctx.tool_context.smtp.config.workers + 4  # more than the e-mail workers: some wait in its queue
        for _ in range(hung):
            await alice.handle_line("/new")
            await alice.send("mail the weekly report")
            await app.ctx.tasks.idle()
        ids = approval_ids(out.getvalue())
        assert len(ids) == hung
        clicks = [asyncio.create_task(alice.handle_line(f"approve {i}")) for i in ids]
        await server.until(lambda s: len(s.messages) == app.ctx.tool_context.smtp.config.workers)
        await alice.handle_line("/new")
        await alice.send("ping")
        # Answered while every e-mail worker is still hung (they hold for SMTP_TIMEOUT, 30 s, and are
        # released only below): the other conversation waits on none of them. An event, not a stopwatch
        # (a 1 s bound here failed at 1.05 s on a loaded 2-core machine).
        async with asyncio.timeout(10):
            await out.wait_for("bot> pong")
        assert len(server.messages) == app.ctx.tool_context.smtp.config.workers  # still hung, none answered
        server.release()  # the hung sends end (in doubt) and the queued ones fail fast
        await asyncio.gather(*clicks)
        await app.ctx.tasks.idle()
    statuses = sorted([(await status_of(app, i)).status for i in ids])
    assert statuses.count("in_doubt") == app.ctx.tool_context.smtp.config.workers
    assert set(statuses) <= {"in_doubt", "failed"}
