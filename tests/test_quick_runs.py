"""A quick run writes its start and its finish only: while a run is young (`CHATOPS_PROGRESS_AFTER`),
a step that only read is kept with the run and stored by its next write, in the same transaction.
Both backends: the stored history and audit rows are those of a run that stored every step; an owner
that stalls after such a step loses nothing that matters (whoever takes the run over repeats the
read and records it); a step that changed something outside (an `auto` write) is stored at once."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from bot.core.run_store import RunClaim
from storage.models import AuditEvent, Conversation, Run, utcnow
from tests.fakes.openai_server import calls, text
from tests.fault_helpers import PLATFORM, FaultChannel, message, settle
from tests.support_tools import Ledger, notes_toolset

COUNT = ("count_notes", {"topic": "ops"})
NOTE = ("write_note", {"topic": "ops", "text": "restart web-1"})
YOUNG = {"CHATOPS_PROGRESS_AFTER": "60"}  # every step of these runs happens while the run is young
QUIET = {"CHATOPS_LEASE_SECONDS": "1", "CHATOPS_SWEEP_INTERVAL": "3600"}  # sweeps only when the test says
AHEAD = timedelta(seconds=30)  # past any lease: a replica with this clock sees every lease expired


async def started(bots, db_url, ledger: Ledger, *, ahead: timedelta | None = None, **env: str):
    app = await bots.start(database_url=db_url, toolsets=[notes_toolset(ledger)], **env)
    if ahead is not None:  # before it starts: every sweep of this replica sees the clock ahead
        app.ctx.clock = lambda: utcnow() + ahead
    app.ctx.channels[PLATFORM] = FaultChannel()
    return await bots.run(app)


def history_writes(app) -> list[int]:
    """How many statements store the conversation's history from now on (one per stored step)."""
    writes = [0]

    def count(_conn, _cursor, statement: str, *_: object) -> None:
        sql = " ".join(statement.lower().replace('"', "").split())
        if sql.startswith("insert into conversation") or (sql.startswith("update conversation set") and "messages=" in sql):
            writes[0] += 1

    sa.event.listen(app.ctx.db.sync_engine, "before_cursor_execute", count)
    return writes


async def stored(app) -> tuple[list[dict], list[str], int]:
    """The conversation's stored history, the audit kinds of its run (chained), and the run's step."""

    async def query(session):
        conv = (await session.execute(sa.select(Conversation))).scalar_one()
        run = (await session.execute(sa.select(Run))).scalar_one()
        kinds = await session.execute(sa.select(AuditEvent.kind).where(AuditEvent.run_id == run.id).order_by(AuditEvent.seq))
        return list(conv.messages), list(kinds.scalars()), run.step

    await app.ctx.tasks.idle()
    await app.ctx.audit.chain(app.ctx.db)
    return await app.ctx.db.run(query, read=True)


def shape(message: dict) -> tuple:
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
    return message["role"], message.get("content"), calls


async def one_turn(bots, db_url, model, **env: str) -> tuple[int, tuple[list[dict], list[str], int]]:
    """Two read steps and an answer: how often the history was stored, and what was stored."""
    model.script(calls(COUNT), calls(COUNT), text("0 notes, twice."))
    app = await started(bots, db_url, Ledger(), **env)
    writes = history_writes(app)
    assert await app.core.accept_message(message("count the notes twice"))
    await settle(app)
    assert app.ctx.channels[PLATFORM].replies == ["0 notes, twice."]
    return writes[0], await stored(app)


async def test_a_quick_run_stores_its_read_steps_with_its_answer(bots, model, db_url):
    _, (history, kinds, step) = await one_turn(bots, db_url, model, **YOUNG)
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert [m["tool_call_id"] for m in history if m["role"] == "tool"] == [
        m["tool_calls"][0]["id"] for m in history if m["role"] == "assistant" and m.get("tool_calls")
    ]
    assert kinds.count("tool_executed") == 2 and kinds.count("model_call") == 3 and step == 3
    assert kinds.index("run_started") < kinds.index("model_call") < kinds.index("tool_executed") < kinds.index("reply_posted")


async def test_it_stores_what_a_run_stored_step_by_step_in_two_writes_fewer(bots, model, tmp_path: Path):
    young_writes, young = await one_turn(bots, f"sqlite:///{tmp_path / 'young.db'}", model, **YOUNG)
    every_writes, every_step = await one_turn(bots, f"sqlite:///{tmp_path / 'every.db'}", model)  # 0 s: step by step
    # The same history (the model numbers its call ids on), audit rows and step count.
    assert [shape(m) for m in young[0]] == [shape(m) for m in every_step[0]] and young[1:] == every_step[1:]
    assert (young_writes, every_writes) == (2, 4)  # start, (step, step,) finish: the steps rode along with the finish


async def test_an_owner_that_stalls_after_a_read_step_loses_it_and_the_new_owner_repeats_the_read(bots, model, db_url):
    hung = asyncio.Event()
    model.script(calls(COUNT), text("late answer from A", until=hung), calls(COUNT), text("answer from B"))
    a = await started(bots, db_url, Ledger(), **YOUNG, **QUIET)
    b = await started(bots, db_url, Ledger(), ahead=AHEAD, **YOUNG, **QUIET)
    assert await a.core.accept_message(message("count the notes"))
    await model.wait_for_requests(2)  # A ran the read, kept it, and hangs on its next model call

    await b.sweeper.sweep()  # A's lease ran out: B takes the run over from what was stored
    await b.ctx.tasks.idle()
    hung.set()  # A's call answers late: its finish (and the read step it kept) changes nothing
    await a.ctx.tasks.idle()
    await settle(a, b)

    assert a.ctx.channels[PLATFORM].replies + b.ctx.channels[PLATFORM].replies == ["answer from B"]
    history, kinds, step = await stored(b)
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]  # B's read, once
    assert history[-1]["content"] == "answer from B"
    assert kinds.count("tool_executed") == 1 and kinds.count("run_taken_over") == 1 and step == 2


async def test_a_step_whose_auto_rule_changed_something_is_stored_at_once(bots, model, db_url, tmp_path: Path):
    policy = tmp_path / "policy.toml"
    policy.write_text('[[tools]]\nmatch = "write_note"\nrule = "auto"\nforce = true\n', encoding="utf-8")
    hung = asyncio.Event()
    ledger = Ledger()
    model.script(calls(NOTE), text("Stored.", until=hung))
    app = await started(bots, db_url, ledger, CHATOPS_POLICY=str(policy), **YOUNG)
    assert await app.core.accept_message(message("write the note"))
    await model.wait_for_requests(2)  # the write ran without approval; the model is thinking again
    assert len(ledger.effects) == 1

    async def query(session):
        return list((await session.execute(sa.select(Conversation))).scalar_one().messages)

    history = await app.ctx.db.run(query, read=True)  # stored before the next model call returned
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    hung.set()
    await settle(app)
    assert app.ctx.channels[PLATFORM].replies == ["Stored."]


async def test_a_line_released_after_its_drive_ended_costs_no_transaction(bots, model, db_url):
    """A held line whose timer fired just as its run answered (its queueing task runs after the
    answer): it is dropped in memory, not fenced by a read of the run."""
    model.script(text("hello"))
    app = await started(bots, db_url, Ledger())
    msg = message("hello")
    assert await app.core.accept_message(msg)
    await settle(app)

    async def the_run(session):
        return (await session.execute(sa.select(Run))).scalar_one()

    run = await app.ctx.db.run(the_run, read=True)
    ended = RunClaim(run.id, run.version, run.conversation_key, run.step, msg.thread, msg.user, None, [], ended=True)
    statements = [0]
    sa.event.listen(app.ctx.db.sync_engine, "before_cursor_execute", lambda *_: statements.__setitem__(0, statements[0] + 1))

    await app.core.runner.store.queue_progress(ended, "Running count_notes…")

    assert statements[0] == 0
    assert app.ctx.channels[PLATFORM].replies == ["hello"]
