"""A preview is a precondition: what the card said would happen is checked again just before the call
runs; if it changed, the call does not run, the card says why and the model is told."""

from __future__ import annotations

import json
import re
import sys

import sqlalchemy as sa

from storage.models import Approval, CrmLead
from tests.fakes.openai_server import calls, text, tool_results
from tests.git_helpers import STAGED_FILE, git

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


async def test_an_mcp_commit_whose_staged_diff_changed_after_the_card_does_not_run(terminal_bot, model, repo, tmp_path):
    """The operator names a read-only tool as the preview of a write tool (`git_diff_staged` for
    `git_commit`): the card shows its answer, and the commit runs only if that answer is unchanged."""
    config = tmp_path / "mcp.json"
    server = {
        "command": sys.executable,
        "args": ["-m", "mcp_server_git", "--repository", str(repo)],
        "trusted": True,
        "tools": {"git_commit": {"preview": "git_diff_staged"}},
    }
    config.write_text(json.dumps({"mcpServers": {"git": server}}))
    model.script(calls(("git__git_commit", {"repo_path": str(repo), "message": "Add line two"})), text("Done."))
    bot = await terminal_bot(CHATOPS_MCP_CONFIG=str(config))
    await bot.say("commit the staged change")
    (approval_id,) = approval_ids(bot.transcript())
    assert "git_diff_staged:" in bot.transcript() and "diff --git a/notes.txt" in bot.transcript()  # the staged diff
    (repo / STAGED_FILE).write_text("one\ntwo\nthree\n")  # someone stages more before the click
    git(repo, "add", STAGED_FILE)
    await bot.say(f"approve {approval_id}")
    assert git(repo, "rev-list", "--count", "HEAD").strip() == "1"  # not committed
    async with bot.app.ctx.db.transaction(read=True) as session:
        stale = await session.get(Approval, approval_id)
    assert stale is not None and stale.status == "cancelled" and "+three" in (stale.decision_reason or "")
