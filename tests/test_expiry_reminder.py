"""The expiry reminder: once a pending approval is past 80% of its lifetime, the sweeper posts one
reminder in its thread (a conditional UPDATE of `reminded_at`: exactly once across sweeps and replicas)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import sqlalchemy as sa

from bot.core.approvals import ApprovalService
from storage.models import AuditEvent, utcnow
from tests.fakes.openai_server import calls
from tests.slack_helpers import (  # noqa: F401 - fixtures
    CHANNEL,
    approval_id_of,
    card_message,
    fake_slack_fixture,
    mention,
    next_ts,
    slack_bot_fixture,
)
from tests.support_tools import Ledger, notes_toolset

NOTE = ("write_note", {"topic": "ops", "text": "restart web-1"})
TTL = 1000


def reminders(bot) -> list[dict]:
    return [m for m in bot.replies() if m["text"].startswith("⏰")]


async def test_one_reminder_near_expiry_however_many_sweeps_and_replicas(slack_bot, fake_slack, model, db_url):
    model.script(calls(NOTE))
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())], database_url=db_url, env={"CHATOPS_APPROVAL_TTL": str(TTL)})
    root = next_ts()
    await bot.send(mention("write a note", ts=root))
    await bot.settle()
    approval_id = approval_id_of(card_message(fake_slack))
    ctx = bot.app.ctx

    ctx.clock = lambda: utcnow() + timedelta(seconds=TTL * 0.5)
    await bot.app.sweeper.sweep()
    await bot.settle()
    assert reminders(bot) == []  # halfway: too early

    ctx.clock = lambda: utcnow() + timedelta(seconds=TTL * 0.85)
    other_replica = ApprovalService(ctx)
    found = await asyncio.gather(
        ctx.tasks.spawn(bot.app.sweeper.sweep(), "sweep-a"),
        other_replica.remind_near_expiry(),
        other_replica.remind_near_expiry(),
    )
    await bot.app.sweeper.sweep()
    await bot.settle()
    assert sum(len(f) for f in found[1:]) <= 1
    (reminder,) = reminders(bot)
    assert (reminder["channel"], reminder["thread_ts"]) == (CHANNEL, root)
    assert approval_id in reminder["text"] and "Write a note about ops" in reminder["text"]
    await ctx.audit.chain(ctx.db)
    async with ctx.db.transaction() as session:
        rows = (await session.execute(sa.select(AuditEvent.approval_id).where(AuditEvent.kind == "approval_reminded"))).all()
    assert rows == [(approval_id,)]


async def test_a_decided_approval_gets_no_reminder(slack_bot, fake_slack, model):
    model.script(calls(NOTE))
    bot = await slack_bot(toolsets=[notes_toolset(Ledger())], env={"CHATOPS_APPROVAL_TTL": str(TTL)})
    await bot.send(mention("write a note"))
    await bot.settle()
    async with bot.app.ctx.db.transaction() as session:
        await session.execute(sa.text("UPDATE approval SET status = 'rejected'"))
    bot.app.ctx.clock = lambda: utcnow() + timedelta(seconds=TTL * 0.9)
    assert await bot.app.core.approvals.remind_near_expiry() == []
    await bot.settle()
    assert reminders(bot) == []
