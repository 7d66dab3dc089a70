"""A preview is a precondition: what the card said would happen is checked again just before the call
runs; if it changed, the call does not run, the card says why and the model is told."""

from __future__ import annotations

import re

import sqlalchemy as sa

from storage.models import Approval, CrmLead
from tests.fakes.openai_server import calls, text, tool_results

LEAD = {"name": "Zhang San", "email": "zhangsan@example.com", "need": "product intro"}


def approval_ids(transcript: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"approve (ap-[a-z0-9]+)", transcript)))


async def test_two_new_lead_cards_for_one_email_the_second_does_not_silently_overwrite(terminal_bot, model):
    model.script(
        calls(("create_crm_lead", LEAD), ("create_crm_lead", {**LEAD, "need": "pricing", "company": "ACME"})),
        text("Done."),
    )
    bot = await terminal_bot()
    await bot.say("create the lead twice")
    first, second = approval_ids(bot.transcript())
    assert bot.transcript().count("will create a new lead") == 2
    await bot.say(f"approve {first}")
    await bot.say(f"approve {second}")
    async with bot.app.ctx.db.transaction(read=True) as session:
        leads = (await session.execute(sa.select(CrmLead))).scalars().all()
        stale = await session.get(Approval, second)
    assert [(lead.need, lead.company) for lead in leads] == [("product intro", None)]  # not overwritten
    assert stale is not None and stale.status == "cancelled"
    assert "changed after the card was shown" in (stale.decision_reason or "")
    assert "A lead with this e-mail exists" in (stale.decision_reason or "")
    results = tool_results(model.requests[-1])
    assert any("changed after the card was shown" in r for r in results)
    assert f"[{second}] Cancelled: what it would do changed" in bot.transcript()


async def test_an_unchanged_preview_runs_normally(terminal_bot, model):
    model.script(calls(("create_crm_lead", LEAD)), text("Created."))
    bot = await terminal_bot()
    await bot.say("create the lead")
    (approval_id,) = approval_ids(bot.transcript())
    await bot.say(f"approve {approval_id}")
    async with bot.app.ctx.db.transaction(read=True) as session:
        assert (await session.get(Approval, approval_id)).status == "succeeded"
