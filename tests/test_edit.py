"""Edit before approve, through the core and the terminal adapter: the typed form, schema checks,
escalation, separation of duties for editors, the audit diff, what the model is told, stale
revisions, and an edit racing an approval."""

from __future__ import annotations

import asyncio
import re
from typing import Literal

import sqlalchemy as sa

from bot.core.approvals import Decision, EditResult
from bot.core.events import DecisionRequest, EditRequest, User
from bot.terminal import TerminalAdapter
from storage.models import Approval, AuditEvent
from tests.fakes.openai_server import calls, text, tool_results
from tests.support_tools import Ledger, RecordingChannel, notes_toolset
from tools.context import ToolContext
from tools.registry import Toolset

ALICE = User("terminal", "alice", "local", "alice")
BOB = User("terminal", "bob", "local", "bob")
CAROL = User("terminal", "carol", "local", "carol")
DAVE = User("terminal", "dave", "local", "dave")
ERIN = User("terminal", "erin", "local", "erin")
NOTE = ("write_note", {"topic": "ops", "text": "restart web-1"})


def approval_ids(transcript: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"approve (ap-[a-z0-9]+)", transcript)))


async def stored(app, approval_id: str) -> Approval:
    async with app.ctx.db.transaction() as session:
        row = await session.get(Approval, approval_id)
        assert row is not None
        return row


async def audit(app, kind: str) -> list[AuditEvent]:
    await app.ctx.tasks.idle()
    async with app.ctx.db.transaction() as session:
        query = sa.select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.seq)
        return list((await session.execute(query)).scalars().all())


def notify_toolset(ledger: Ledger) -> Toolset:
    toolset = Toolset("test-notify")

    @toolset.tool(describe=lambda a: f"Notify {a['to']}")
    async def notify(
        ctx: ToolContext,
        to: str,
        text: str,
        urgent: bool = False,
        tags: list[str] | None = None,
        level: Literal["info", "warn"] = "info",
    ) -> str:
        """Send a notification.

        Args:
            to: The recipient's e-mail address.
            text: What to say.
            urgent: Whether to page them.
            tags: Labels for the notification.
            level: How loud.
        """
        ledger.effects.append({"to": to, "text": text, "urgent": urgent, "approval_id": ctx.approval_id})
        return f"notified {to}"

    return toolset


POLICY = """
[[tools]]
match = "notify"
rule = "confirm"
approvers = ["terminal:bob", "terminal:carol", "terminal:dave", "terminal:erin"]
  [tools.external_recipients]
  allowed_domains = ["example.com"]
  fields = ["to"]
  rule = "two_person"

[[tools]]
match = "write_note"
rule = "approve"
separate = true
approvers = ["terminal:bob", "terminal:carol"]
"""


async def test_terminal_edit_asks_per_field_runs_the_edited_call_audits_the_diff_and_tells_the_model(terminal_bot, model):
    ledger = Ledger()
    model.script(calls(NOTE), text("Stored."))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())

    await bot.say(f"edit {approval_id}")
    assert "topic (string, required) [ops]:" in bot.transcript()
    await bot.say("")  # topic kept
    assert "text (string, required) [restart web-1]:" in bot.transcript()
    await bot.say("restart web-2")
    assert "priority (integer) [1]:" in bot.transcript()
    await bot.say("3")
    assert "Edited. Earlier approvals were reset" in bot.transcript()
    assert "│ restart web-2" in bot.transcript()  # the new version, printed in full

    row = await stored(bot.app, approval_id)
    assert row.revision == 2 and row.args == {"topic": "ops", "text": "restart web-2", "priority": 3}
    (edited,) = await audit(bot.app, "approval_edited")
    assert edited.actor == "terminal:local:alice"
    assert edited.data["changes"] == [
        {"field": "text", "before": "restart web-1", "after": "restart web-2"},
        {"field": "priority", "before": 1, "after": 3},
    ]
    assert edited.data["args_sha256"] == row.args_sha256 != edited.data["previous_sha256"]

    await bot.say(f"approve {approval_id}")
    assert ledger.effects == [{"topic": "ops", "text": "restart web-2", "priority": 3, "approval_id": approval_id}]
    (result,) = tool_results(model.requests[-1])
    assert result.startswith("Note: alice edited the arguments of this call before it was decided.")
    assert '"text":"restart web-2"' in result and result.endswith("note 1 stored")


async def test_schema_violations_are_refused_with_the_field_named_and_nothing_changes(terminal_bot, model):
    model.script(calls(NOTE), text("ok"))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())])
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    core = bot.core

    outcome = await core.edit(EditRequest(approval_id, ALICE, 1, {"priority": "high", "topic": ""}))
    assert outcome.kind == EditResult.INVALID
    assert outcome.errors == {"priority": "must be a whole number", "topic": "a value is required"}
    outcome = await core.edit(EditRequest(approval_id, ALICE, 1, {"priority": "2.5"}))
    assert outcome.kind == EditResult.INVALID and set(outcome.errors or {}) == {"priority"}
    outcome = await core.edit(EditRequest(approval_id, ALICE, 1, {"text": "restart web-1"}))
    assert outcome.kind == EditResult.UNCHANGED
    assert (await stored(bot.app, approval_id)).revision == 1
    assert await audit(bot.app, "approval_edited") == []

    await bot.say(f"edit {approval_id}")
    await bot.say("")
    await bot.say("")
    await bot.say("lots")
    assert "priority: must be a whole number" in bot.transcript()
    assert (await stored(bot.app, approval_id)).revision == 1


async def test_the_form_is_typed_from_the_schema_and_the_schema_refuses_what_does_not_fit(terminal_bot, model):
    model.script(calls(("notify", {"to": "ops@example.com", "text": "hi", "tags": ["a"]})), text("ok"))
    bot = await terminal_bot(toolsets=[notify_toolset(Ledger())])
    await bot.say("notify ops")
    (approval_id,) = approval_ids(bot.transcript())
    opened = await bot.core.open_edit(EditRequest(approval_id, ALICE, 1))
    assert opened.form is not None
    kinds = {f.name: (f.kind, f.value, f.options) for f in opened.form.fields}
    assert kinds == {
        "to": ("string", "ops@example.com", ()),
        "text": ("string", "hi", ()),
        "urgent": ("boolean", "false", ()),
        "tags": ("json", '["a"]', ()),
        "level": ("enum", "info", ("info", "warn")),
    }
    outcome = await bot.core.edit(EditRequest(approval_id, ALICE, 1, {"tags": '{"a": 1}', "level": "loud", "urgent": "maybe"}))
    assert outcome.kind == EditResult.INVALID
    assert outcome.errors == {"level": "must be one of: info, warn", "urgent": "must be true or false"}
    outcome = await bot.core.edit(EditRequest(approval_id, ALICE, 1, {"tags": '{"a": 1}'}))
    assert outcome.errors == {"tags": "not valid: Input should be a valid list"}
    outcome = await bot.core.edit(EditRequest(approval_id, ALICE, 1, {"tags": '["a", "b"]', "level": "warn", "urgent": "yes"}))
    assert outcome.kind == EditResult.EDITED
    row = await stored(bot.app, approval_id)
    assert row.args == {"to": "ops@example.com", "text": "hi", "urgent": True, "tags": ["a", "b"], "level": "warn"}


async def test_an_edit_can_escalate_the_rule_and_resets_the_votes(terminal_bot, model, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY, encoding="utf-8")
    ledger = Ledger()
    model.script(calls(("notify", {"to": "ops@example.com", "text": "deploy at 5"})), text("Sent."))
    bot = await terminal_bot(toolsets=[notify_toolset(ledger)], CHATOPS_POLICY=str(policy))
    await bot.say("notify ops")
    (approval_id,) = approval_ids(bot.transcript())
    core = bot.core
    assert (await stored(bot.app, approval_id)).rule == "confirm"

    outcome = await core.edit(EditRequest(approval_id, BOB, 1, {"to": "partner@elsewhere.org", "urgent": "yes"}))
    assert outcome.kind == EditResult.EDITED
    assert outcome.message == "Edited. The new values need a stricter rule (two_person); earlier approvals were reset."
    row = await stored(bot.app, approval_id)
    assert (row.rule, row.revision, row.args["urgent"]) == ("two_person", 2, True)
    assert outcome.card is not None and any("external recipients: partner@elsewhere.org" in w for w in outcome.card.warnings)

    # the requester could confirm before; now two approvers other than requester and editor are needed
    refused = await core.decide(DecisionRequest(approval_id, ALICE, approve=True, revision=2))
    assert refused.kind == Decision.NOT_ALLOWED
    first = await core.decide(DecisionRequest(approval_id, CAROL, approve=True, revision=2))
    assert first.kind == Decision.VOTE_RECORDED and ledger.effects == []
    # another edit resets the vote; both editors now count as requesters
    outcome = await core.edit(EditRequest(approval_id, DAVE, 2, {"text": "deploy at 6"}))
    assert outcome.kind == EditResult.EDITED and outcome.message.startswith("Edited. Earlier approvals")
    row = await stored(bot.app, approval_id)
    assert (row.votes, row.revision) == ([], 3)
    assert [r.data["votes_reset"] for r in await audit(bot.app, "approval_edited")] == [0, 1]
    for editor in (BOB, DAVE):
        refused = await core.decide(DecisionRequest(approval_id, editor, approve=True, revision=3))
        assert refused.kind == Decision.NOT_ALLOWED and "whoever edited the request" in refused.message
    assert (await core.decide(DecisionRequest(approval_id, CAROL, approve=True, revision=3))).kind == Decision.VOTE_RECORDED
    assert (await core.decide(DecisionRequest(approval_id, ERIN, approve=True, revision=3))).kind == Decision.APPROVED
    await bot.app.ctx.tasks.idle()
    assert [(e["to"], e["text"]) for e in ledger.effects] == [("partner@elsewhere.org", "deploy at 6")]


async def test_votes_are_reset_and_the_editing_approver_cannot_approve_their_own_edit(terminal_bot, model, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(
        POLICY.replace('"terminal:bob", "terminal:carol"]\n"""', '"terminal:bob", "terminal:carol"]'), encoding="utf-8"
    )
    ledger = Ledger()
    model.script(calls(NOTE), text("ok"))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)], CHATOPS_POLICY=str(policy))
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    core = bot.core

    stranger = await core.open_edit(EditRequest(approval_id, User("terminal", "mallory", "local", "mallory")))
    assert stranger.kind == EditResult.NOT_ALLOWED and stranger.form is None
    form = await core.open_edit(EditRequest(approval_id, BOB, 1))
    assert form.form is not None
    assert [(f.name, f.kind, f.value, f.required) for f in form.form.fields] == [
        ("topic", "string", "ops", True),
        ("text", "string", "restart web-1", True),
        ("priority", "integer", "1", False),
    ]
    outcome = await core.edit(EditRequest(approval_id, BOB, 1, {"text": "restart web-1 and web-2"}))
    assert outcome.kind == EditResult.EDITED
    assert outcome.card is not None and outcome.card.edited_by == ("bob",) and outcome.card.revision == 2

    own = await core.decide(DecisionRequest(approval_id, BOB, approve=True, revision=2))
    assert own.kind == Decision.NOT_ALLOWED and "whoever edited the request cannot approve it" in own.message
    requester = await core.decide(DecisionRequest(approval_id, ALICE, approve=True, revision=2))
    assert requester.kind == Decision.NOT_ALLOWED
    approved = await core.decide(DecisionRequest(approval_id, CAROL, approve=True, revision=2))
    assert approved.kind == Decision.APPROVED
    await bot.app.ctx.tasks.idle()
    assert [e["text"] for e in ledger.effects] == ["restart web-1 and web-2"]
    # nobody edits a decided approval
    late = await core.open_edit(EditRequest(approval_id, ALICE))
    assert late.kind == EditResult.ALREADY and late.form is None


async def test_a_click_on_the_card_before_the_edit_acts_on_nothing(terminal_bot, model):
    ledger = Ledger()
    model.script(calls(NOTE), text("ok"))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    core = bot.core
    assert (await core.edit(EditRequest(approval_id, ALICE, 1, {"text": "v2"}))).kind == EditResult.EDITED
    stale = await core.decide(DecisionRequest(approval_id, ALICE, approve=True, revision=1))
    assert stale.kind == Decision.STALE and (await stored(bot.app, approval_id)).status == "pending"
    again = await core.edit(EditRequest(approval_id, ALICE, 1, {"text": "v3"}))
    assert again.kind == EditResult.STALE
    assert [r.status for r in await audit(bot.app, "click_refused")] == ["stale"]
    assert (await core.decide(DecisionRequest(approval_id, ALICE, approve=True, revision=2))).kind == Decision.APPROVED
    await bot.app.ctx.tasks.idle()
    assert [e["text"] for e in ledger.effects] == ["v2"]


async def test_an_edit_racing_an_approval_has_exactly_one_winner(bots, model, db_url):
    ledger = Ledger()
    app = await bots.start(toolsets=[notes_toolset(ledger)], database_url=db_url)
    channel = RecordingChannel("terminal")
    app.ctx.channels["terminal"] = channel
    await bots.run(app)
    model.responder = lambda body: text("ok") if body["messages"][-1]["role"] == "tool" else calls(NOTE)
    outcomes: list[EditResult] = []
    seen: set[str] = set()
    for round_ in range(4):
        await TerminalAdapter(app.core, user=ALICE, session=f"race-{round_}").send("write a note")
        await app.ctx.tasks.idle()
        (approval_id,) = {c.approval_id for c in channel.cards} - seen
        seen.add(approval_id)
        edit, click = await asyncio.gather(
            app.core.edit(EditRequest(approval_id, ALICE, 1, {"text": f"edited {round_}"})),
            app.core.decide(DecisionRequest(approval_id, ALICE, approve=True, revision=1)),
        )
        await app.ctx.tasks.idle()
        row = await stored(app, approval_id)
        ran = [e["text"] for e in ledger.effects if e["approval_id"] == approval_id]
        if edit.kind == EditResult.EDITED:
            assert click.kind == Decision.STALE and row.status == "pending" and row.revision == 2 and ran == []
        else:
            assert (edit.kind, click.kind) == (EditResult.ALREADY, Decision.APPROVED)
            assert row.revision == 1 and ran == ["restart web-1"]
        outcomes.append(edit.kind)
    assert len(outcomes) == 4


async def test_the_audit_diff_goes_through_the_redactor(terminal_bot, model):
    model.script(calls(NOTE), text("ok"))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())])
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    token = "xoxb-1234567890-abcdefghijklmnop"
    outcome = await bot.core.edit(EditRequest(approval_id, ALICE, 1, {"text": f"use {token}"}))
    assert outcome.kind == EditResult.EDITED
    (edited,) = await audit(bot.app, "approval_edited")
    assert edited.data["changes"] == [{"field": "text", "before": "restart web-1", "after": "use [REDACTED]"}]
    assert token not in str(edited.data)


async def test_nothing_printed_to_the_terminal_carries_an_escape_sequence(terminal_bot, model):
    """A model reply `\\x1b[?7l` turned off the terminal's line wrapping, so the next card's recipient
    list was cut at the screen's edge; a reply starting `\\r\\x1b[2K` drew a card of its own; an argument
    value redrew the edit prompt to read "harmless". Every printed text is now inert: the controls show
    as ⟨U+…⟩ markers and line breaks stay."""
    hostile = {"topic": "Q3\x1b[2K\r\x1b[1Abot> topic [current: harmless]", "text": "restart web-1"}
    model.script(text("Hello!\x1b[?7l\r\x1b[2K┌─ Approval needed\nsecond line\tend"))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())])
    await bot.say("hi")
    model.script(calls(("write_note", hostile)), text("Stored."))
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    await bot.say(f"edit {approval_id}")

    shown = bot.transcript()
    assert not any(ch in shown for ch in "\x1b\r\x07\x9b")
    assert "Hello!⟨U+001B⟩[?7l⟨U+000D⟩⟨U+001B⟩[2K┌─ Approval needed\nsecond line\tend" in shown
    assert "Q3⟨U+001B⟩[2K⟨U+000D⟩⟨U+001B⟩[1Abot> topic [current: harmless]" in shown  # the prompt's current value


def test_a_whole_number_in_a_number_field_is_read_back_exactly():
    """An Edit form sends every field back, the untouched ones too; a 20-digit number went through float
    and came back changed (12345678901234567890 -> 12345678901234567168): an edit the editor never made."""
    from bot.core.edit_form import EditField, EditForm, read_values

    form = EditForm("ap-1", 1, "t", (EditField("n", "number", "12345678901234567890"), EditField("x", "number", "0.5")))
    args, errors = read_values(form, {}, {"n": "12345678901234567890", "x": " 2.50 "})
    assert errors == {} and args == {"n": 12345678901234567890, "x": 2.5}
    assert read_values(form, {}, {"n": "1e3"})[0] == {"n": 1000.0} and "n" in read_values(form, {}, {"n": "nan"})[1]
