"""The seed tutorial end to end through the terminal adapter: a Chinese request -> two write calls ->
two cards -> both approved -> the lead row exists and the UTF-8 e-mail reached a real SMTP server ->
final reply -> `chatops audit export` shows the whole trail."""

from __future__ import annotations

import asyncio
import json

import sqlalchemy as sa

from bot.cli import run as chatops
from storage.models import CrmLead
from tests.fakes.openai_server import calls, text, tool_results
from tests.fakes.smtp_server import FakeSmtp
from tests.test_core_agent import approval_ids

REQUEST = "客户张三想了解产品，邮箱是 zhangsan@example.com，请创建线索并发送介绍邮件"
SUBJECT = "产品介绍：欢迎了解我们的产品"
BODY = "张三您好：\n\n感谢您对我们产品的关注，附上产品介绍。\n\n祝好"


async def test_seed_scenario_through_the_terminal(terminal_bot, model, monkeypatch, tmp_path, sqlite_url):
    model.script(
        calls(
            ("create_crm_lead", {"name": "张三", "email": "zhangsan@example.com", "need": "想了解产品"}),
            ("send_email", {"to": "zhangsan@example.com", "subject": SUBJECT, "body": BODY}),
        ),
        text("已为张三创建线索，并发送了产品介绍邮件。"),
    )
    async with FakeSmtp() as smtp:
        bot = await terminal_bot(
            SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp.port), SMTP_SECURITY="none", SMTP_FROM="Sales Bot <bot@example.com>"
        )
        await bot.say(REQUEST)
        lead_approval, mail_approval = approval_ids(bot.transcript())
        assert "需要审批" in bot.transcript() and smtp.attempts == []  # a Chinese request: Chinese cards
        await bot.say(f"approve {lead_approval}")
        await bot.say(f"approve {mail_approval}")

    async with bot.app.ctx.db.transaction() as session:
        leads = (await session.execute(sa.select(CrmLead))).scalars().all()
    assert [(x.name, x.email, x.need) for x in leads] == [("张三", "zhangsan@example.com", "想了解产品")]
    (mail,) = smtp.delivered
    message = mail.message()
    assert message["Subject"] == SUBJECT and message["To"] == "zhangsan@example.com"
    assert message.get_content().replace("\r\n", "\n").strip() == BODY.strip()
    assert mail_approval in message["Message-ID"]
    assert "bot> 已为张三创建线索，并发送了产品介绍邮件。" in bot.transcript()
    assert len(tool_results(model.requests[-1])) == 2

    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    export = tmp_path / "audit.jsonl"
    assert await asyncio.to_thread(chatops, ["audit", "export", "--format", "jsonl", "--output", str(export)]) == 0
    rows = [json.loads(line) for line in export.read_text(encoding="utf-8").splitlines()]
    trail = [(r["kind"], r["tool"], r["status"]) for r in rows]
    assert ("request_received", None, "queued") in trail
    assert ("model_call", None, "ok") in trail
    for tool in ("create_crm_lead", "send_email"):
        for step in [
            ("tool_proposed", tool, "confirm"),
            ("approval_requested", tool, "pending"),
            ("card_posted", tool, "posted"),
            ("approval_decided", tool, "approved"),
            ("execution_started", tool, "executing"),
            ("tool_executed", tool, "succeeded"),
        ]:
            assert step in trail, step
    assert trail[-1] == ("reply_posted", None, "done")
    decided = [r for r in rows if r["kind"] == "approval_decided"]
    assert {r["actor"] for r in decided} == {"terminal:local:alice"}
    assert await asyncio.to_thread(chatops, ["audit", "verify"]) == 0
