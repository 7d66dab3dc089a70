"""The agent loop and the approval flow through the terminal adapter, against a scripted model."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from datetime import timedelta

import pytest
import sqlalchemy as sa

from bot.core import texts
from bot.core.errors import StorageError
from bot.core.events import DecisionRequest, User
from storage.models import Approval, AuditEvent, Run, utcnow
from tests.fakes.openai_server import calls, dropped, failure, raw, text, tool_results
from tests.support_tools import Ledger, notes_toolset

BOB = User("terminal", "bob", "local", "bob")


def approval_ids(transcript: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"approve (ap-[a-z0-9]+)", transcript)))


async def audit_rows(app, **where) -> list[AuditEvent]:
    async with app.ctx.db.transaction() as session:
        query = sa.select(AuditEvent).order_by(AuditEvent.seq)
        for key, value in where.items():
            query = query.where(getattr(AuditEvent, key) == value)
        return list((await session.execute(query)).scalars().all())


async def approval(app, approval_id: str) -> Approval:
    async with app.ctx.db.transaction() as session:
        row = await session.get(Approval, approval_id)
        assert row is not None
        return row


async def test_two_write_calls_in_one_turn_each_get_a_card_and_run_after_approval(terminal_bot, model):
    ledger = Ledger()
    model.script(
        calls(("write_note", {"topic": "a", "text": "first"}), ("write_note", {"topic": "b", "text": "second", "priority": 3})),
        text("Both notes are stored."),
    )
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("store two notes")
    first, second = approval_ids(bot.transcript())
    assert ledger.effects == []  # nothing runs before a decision
    await bot.say(f"approve {second}")
    assert [e["approval_id"] for e in ledger.effects] == [second]
    assert len(model.requests) == 1  # the model waits until every call of the turn is decided
    await bot.say(f"approve {first}")
    assert sorted(e["approval_id"] for e in ledger.effects) == sorted([first, second])
    assert ledger.effects[0] == {"topic": "b", "text": "second", "priority": 3, "approval_id": second}
    assert "bot> Both notes are stored." in bot.transcript()
    results = tool_results(model.requests[-1])
    assert results == ["note 2 stored", "note 1 stored"]  # in call order, matched by id, not by click order
    statuses = {(r.kind, r.status) for r in await audit_rows(bot.app)}
    for expected in [
        ("request_received", "queued"),
        ("model_call", "ok"),
        ("tool_proposed", "confirm"),
        ("approval_requested", "pending"),
        ("card_posted", "posted"),
        ("approval_decided", "approved"),
        ("execution_started", "executing"),
        ("tool_executed", "succeeded"),
        ("reply_posted", "done"),
    ]:
        assert expected in statuses


async def test_read_tools_run_at_once_without_a_card(terminal_bot, model):
    model.script(calls(("count_notes", {"topic": "x"})), text("There are 0 notes."))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())])
    await bot.say("how many notes about x?")
    assert approval_ids(bot.transcript()) == []
    assert tool_results(model.requests[-1]) == ["0"]
    assert "bot> There are 0 notes." in bot.transcript()


async def test_reject_with_reason_runs_nothing_and_the_model_reads_the_reason(terminal_bot, model):
    ledger = Ledger()
    model.script(
        calls(("write_note", {"topic": "a", "text": "x"})), text("OK, I did not write it."), text("Sure, anything else?")
    )
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    await bot.say(f"reject {approval_id} wrong topic, use b")
    assert ledger.effects == []
    assert tool_results(model.requests[-1]) == ["Rejected by alice: wrong topic, use b"]
    assert "bot> OK, I did not write it." in bot.transcript()
    assert (await approval(bot.app, approval_id)).status == "rejected"
    await bot.say("thanks")  # the conversation continues with its memory
    roles = [m["role"] for m in model.requests[-1]["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user"]


async def test_expired_approval_runs_nothing_and_the_model_is_told(terminal_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "a", "text": "x"})), text("It expired."))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)], CHATOPS_APPROVAL_TTL="60")
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    bot.app.ctx.clock = lambda: utcnow() + timedelta(seconds=61)
    await bot.say(f"approve {approval_id}")
    assert ledger.effects == []
    assert "expired" in bot.transcript()
    assert (await approval(bot.app, approval_id)).status == "expired"
    assert tool_results(model.requests[-1]) == ["Not run: the approval expired without a decision."]


async def test_the_sweeper_expires_overdue_approvals(terminal_bot, model):
    model.script(calls(("write_note", {"topic": "a", "text": "x"})), text("It expired."))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())], CHATOPS_APPROVAL_TTL="60")
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    bot.app.ctx.clock = lambda: utcnow() + timedelta(seconds=61)
    await bot.app.sweeper.sweep()
    await bot.app.ctx.tasks.idle()
    assert (await approval(bot.app, approval_id)).status == "expired"
    assert "bot> It expired." in bot.transcript()


async def test_a_second_decision_changes_nothing(terminal_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "a", "text": "x"})), text("done"))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    await bot.say(f"approve {approval_id}")
    await bot.say(f"reject {approval_id} too late")
    await bot.say(f"approve {approval_id}")
    assert len(ledger.effects) == 1
    assert bot.transcript().count("This request was already approved by alice.") == 2
    assert (await approval(bot.app, approval_id)).status == "succeeded"


async def test_someone_else_cannot_decide_and_the_refusal_is_audited(terminal_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "a", "text": "x"})), text("done"))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    outcome = await bot.core.decide(DecisionRequest(approval_id, BOB, approve=True))
    assert outcome.kind == "not_allowed" and "only alice" in outcome.message
    await bot.app.ctx.tasks.idle()
    assert ledger.effects == [] and (await approval(bot.app, approval_id)).status == "pending"
    refused = await audit_rows(bot.app, kind="click_refused")
    assert [(r.actor, r.status) for r in refused] == [("terminal:local:bob", "not_allowed")]


async def test_concurrent_clicks_execute_exactly_once(terminal_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "a", "text": "x"})), text("done"))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    alice = bot.adapter.user
    outcomes = await asyncio.gather(
        *[bot.core.decide(DecisionRequest(approval_id, alice, approve=i % 3 != 0)) for i in range(10)],
        return_exceptions=True,
    )
    # On a loaded machine a click may meet SQLite's write lock busy past its budget: that clicker is
    # told to click again (StorageError), and nothing changed for it.
    assert all(isinstance(o, StorageError) for o in outcomes if isinstance(o, BaseException)), outcomes
    winners = [o for o in outcomes if not isinstance(o, BaseException) and o.kind in ("approved", "rejected")]
    assert len(winners) <= 1
    if not winners:  # every click met the busy lock: the click again, as the clickers were told
        winners = [await bot.core.decide(DecisionRequest(approval_id, alice, approve=True))]
    await bot.app.ctx.tasks.idle()
    assert len(ledger.effects) == (1 if winners[0].kind == "approved" else 0)


async def test_bad_tool_calls_are_fed_back_to_the_model_and_run_nothing(terminal_bot, model):
    ledger = Ledger()
    model.script(
        calls(
            ("write_note", {"topic": "a"}),
            ("drop_database", {}),
            ("write_note", {"topic": "a", "text": "x", "priority": "high"}),
        ),
        text("I could not do that."),
    )
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("do something odd")
    assert ledger.effects == [] and approval_ids(bot.transcript()) == []
    kinds = [json.loads(r)["error"] for r in tool_results(model.requests[-1])]
    assert kinds == ["invalid_arguments", "unknown_tool", "invalid_arguments"]
    missing = json.loads(tool_results(model.requests[-1])[0])
    assert missing["details"][0]["field"] == "text"
    invalid = await audit_rows(bot.app, kind="tool_call_invalid")
    assert len(invalid) == 3


@pytest.mark.parametrize("arguments", ['{"topic": "a", "text": ', '["not", "an", "object"]', '"text"'])
async def test_tool_call_arguments_that_are_not_an_object_are_a_model_error_retried_in_one_layer(terminal_bot, model, arguments):
    ledger = Ledger()
    model.script(calls(("write_note", arguments)), text("Sorry, let me answer plainly."))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)], CHATOPS_MODEL_RETRIES="2")
    await bot.say("do something odd")
    assert len(model.requests) == 2 and ledger.effects == []
    assert "bot> Sorry, let me answer plainly." in bot.transcript()


async def test_a_model_that_keeps_breaking_the_api_promise_ends_the_run_with_one_sentence(terminal_bot, model, caplog):
    caplog.set_level(logging.WARNING, logger="chatops.runner")
    ledger = Ledger()
    model.script(*[calls(("write_note", "[1]")) for _ in range(3)], text("second conversation answered"))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)], CHATOPS_MODEL_RETRIES="2")
    await bot.say("do something odd")
    assert len(model.requests) == 3 and ledger.effects == []
    assert f"bot> {texts.MODEL_BAD_RESPONSE}" in bot.transcript()  # it answered: it is not "not answering"
    failed = [r.getMessage() for r in caplog.records if r.name == "chatops.runner"]
    assert len(failed) == 1 and "the model did not answer after its retries" in failed[0]  # the operator sees it too
    await bot.say("and now?")
    assert "bot> second conversation answered" in bot.transcript()


async def test_model_429_and_500_are_retried_then_answered(terminal_bot, model):
    model.script(failure(429, retry_after=0.05), failure(500), text("hello after retries"))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())], CHATOPS_MODEL_RETRIES="2")
    await bot.say("hi")
    assert len(model.requests) == 3
    assert "bot> hello after retries" in bot.transcript()


async def test_model_failure_after_retries_tells_the_user_and_runs_no_tool(terminal_bot, model):
    ledger = Ledger()
    model.script(failure(503), failure(503), calls(("write_note", {"topic": "a", "text": "x"})))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)], CHATOPS_MODEL_RETRIES="1")
    await bot.say("write a note")
    assert len(model.requests) == 2
    assert "language model is not answering" in bot.transcript()
    assert ledger.effects == [] and approval_ids(bot.transcript()) == []
    errors = await audit_rows(bot.app, kind="model_error")
    assert errors and "HTTP 503" in errors[0].data["error"]


async def test_a_dropped_model_connection_is_retried_then_answered(terminal_bot, model):
    model.script(dropped(), text("hello after a dropped connection"))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())], CHATOPS_MODEL_RETRIES="1")
    await bot.say("hi")
    assert len(model.requests) == 2
    assert "bot> hello after a dropped connection" in bot.transcript()


async def test_a_model_endpoint_that_keeps_dropping_is_reported_as_such(terminal_bot, model):
    model.script(dropped(), dropped())
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())], CHATOPS_MODEL_RETRIES="1")
    await bot.say("hi")
    assert len(model.requests) == 2
    assert f"bot> {texts.MODEL_FAILED}" in bot.transcript()
    errors = await audit_rows(bot.app, kind="model_error")
    assert errors[0].data["error"] == "model endpoint closed the connection"


# A server that answers 200 with what is not a usable completion: each is retried, then reported.
UNUSABLE = {
    "not JSON": ("<html>gateway</html>", "not JSON"),
    "no choices": ('{"model": "m", "choices": []}', "no choices"),
    "empty message": ('{"choices": [{"message": {"role": "assistant"}}]}', "neither text nor tool calls"),
    "call without id": (
        '{"choices": [{"message": {"tool_calls": [{"type": "function", "function": {"name": "count_notes"}}]}}]}',
        "a tool call without an id or a name",
    ),
    "arguments not an object": (
        '{"choices": [{"message": {"tool_calls": [{"id": "c1", "function": {"name": "count_notes", "arguments": "[1]"}}]}}]}',
        "arguments of count_notes are not a JSON object",
    ),
    "content not text": (
        '{"choices": [{"message": {"content": {"text": "hi"}}}]}',
        "not a completion (at choices.0.message.content)",
    ),
    "lone surrogate in the text": ('{"choices": [{"message": {"content": "hi \\ud800"}}]}', "not JSON"),
    "lone surrogate in the arguments": (
        '{"choices": [{"message": {"tool_calls": [{"id": "c1", "function": {"name": "count_notes",'
        ' "arguments": "{\\"topic\\": \\"\\\\ud800\\"}"}}]}}]}',
        "arguments of count_notes are not a JSON object",
    ),
}


@pytest.mark.parametrize("case", UNUSABLE, ids=list(UNUSABLE))
async def test_an_unusable_model_answer_is_retried_then_reported(terminal_bot, model, case):
    body, why = UNUSABLE[case]
    model.script(raw(body), text("hello after a bad answer"), raw(body), raw(body))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())], CHATOPS_MODEL_RETRIES="1")
    await bot.say("hi")
    assert "bot> hello after a bad answer" in bot.transcript()
    await bot.say("hi again")
    assert len(model.requests) == 4
    assert f"bot> {texts.MODEL_BAD_RESPONSE}" in bot.transcript() and texts.MODEL_FAILED not in bot.transcript()
    errors = await audit_rows(bot.app, kind="model_error")
    assert [e.data["error"] for e in errors] == [f"model reply unusable: {why}"]


async def test_a_compatible_server_that_omits_and_adds_fields_is_understood(terminal_bot, model):
    """Only what the bot reads is required: no id, object or created; extra fields anywhere; null usage counts."""
    ledger = Ledger()
    tool_call = (
        '{"id": "c1", "type": "function", "function": {"name": "count_notes", "arguments": "{\\"topic\\": \\"x\\"}"}, "index": 0}'
    )
    model.script(
        raw(
            f'{{"choices": [{{"message": {{"content": null, "tool_calls": [{tool_call}]}}, "logprobs": null}}], "system_fingerprint": "fp"}}'
        ),
        raw(
            '{"model": "local-7b", "choices": [{"message": {"content": "There are 0 notes."}}], "usage": {"prompt_tokens": null}}'
        ),
    )
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("how many notes?")
    assert "bot> There are 0 notes." in bot.transcript()
    assert tool_results(model.requests[-1]) != []


async def test_model_timeout_is_bounded(terminal_bot, model):
    model.script(text("too slow", delay=2), text("too slow", delay=2))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())], CHATOPS_MODEL_TIMEOUT="0.3", CHATOPS_MODEL_RETRIES="1")
    await bot.say("hi")
    assert len(model.requests) == 2
    assert "language model is not answering" in bot.transcript()
    errors = await audit_rows(bot.app, kind="model_error")
    assert errors[0].data["error"] == "model endpoint timed out"


async def test_tool_failures_and_doubt_reach_the_model(terminal_bot, model):
    ledger = Ledger()
    model.script(
        calls(("write_note", {"topic": "fail", "text": "x"}), ("write_note", {"topic": "doubt", "text": "y"})),
        text("One failed, one is unknown."),
    )
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("write two notes")
    first, second = approval_ids(bot.transcript())
    await bot.say(f"approve {first}")
    await bot.say(f"approve {second}")
    assert (await approval(bot.app, first)).status == "failed"
    assert (await approval(bot.app, second)).status == "in_doubt"
    results = tool_results(model.requests[-1])
    assert results[0] == "Failed: the note store refused the note"
    assert results[1].startswith("Outcome unknown: the store dropped the connection")


async def test_a_new_message_supersedes_pending_proposals(terminal_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "a", "text": "x"})), text("Cancelled that; what topic instead?"))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    await bot.say("actually, don't")
    assert (await approval(bot.app, approval_id)).status == "cancelled"
    messages = model.requests[-1]["messages"]
    assert messages[-2]["role"] == "tool" and "cancelled" in messages[-2]["content"]
    assert messages[-1] == {"role": "user", "content": "actually, don't", "name": "alice"}
    await bot.say(f"approve {approval_id}")
    assert ledger.effects == []


async def test_step_limit_stops_the_loop(terminal_bot, model):
    model.responder = lambda body: calls(("count_notes", {"topic": "x"}))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())], CHATOPS_MAX_STEPS="3")
    await bot.say("loop forever")
    assert len(model.requests) == 3
    assert "I stopped after 3 steps" in bot.transcript()
    async with bot.app.ctx.db.transaction() as session:
        runs = (await session.execute(sa.select(Run))).scalars().all()
    assert [r.status for r in runs] == ["failed"]


async def test_executing_left_by_a_dead_process_becomes_in_doubt_and_is_never_rerun(terminal_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "a", "text": "x"})), text("It may or may not have run."))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("write a note")
    (approval_id,) = approval_ids(bot.transcript())
    async with bot.app.ctx.db.transaction() as session:  # what a crash mid-execution leaves behind
        await session.execute(
            sa.update(Approval)
            .where(Approval.id == approval_id)
            .values(status="executing", executor="gone-host:1:dead", decided_by="alice", decided_at=utcnow())
        )
    await bot.app.sweeper.sweep()
    await bot.app.ctx.tasks.idle()
    assert (await approval(bot.app, approval_id)).status == "in_doubt"
    assert ledger.effects == []
    assert "was interrupted while running; its outcome is unknown and it was NOT retried" in bot.transcript()
    assert await audit_rows(bot.app, kind="execution_in_doubt")
