"""Lease take-over between two live replicas: replica A owns a run and hangs on its model call; replica
B, whose clock runs ahead (clock skew, or simply A's lease having run out), sees the lease expired,
takes the run over and finishes it. When A's model call finally answers, every write of A is fenced
by the version it claimed: one answer, posted once, and the audit names A as the previous owner.
Both backends."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import sqlalchemy as sa

from bot.core.events import DecisionRequest
from storage.models import AuditEvent, Run, utcnow
from tests.fakes.openai_server import calls, text
from tests.fault_helpers import ALICE, PLATFORM, FaultChannel, Stages, message, settle

AHEAD = timedelta(seconds=30)  # far past any lease: B sees every lease of A as expired
QUIET = {"CHATOPS_LEASE_SECONDS": "1", "CHATOPS_SWEEP_INTERVAL": "3600"}  # sweeps only when the test says


async def two_replicas(bots, db_url, stages: Stages | None = None):
    toolsets = [stages.toolset()] if stages else []
    a = await bots.start(database_url=db_url, toolsets=toolsets, **QUIET)
    b = await bots.start(database_url=db_url, toolsets=toolsets, **QUIET)
    b.ctx.clock = lambda: utcnow() + AHEAD
    for app in (a, b):
        app.ctx.channels[PLATFORM] = FaultChannel()
        await bots.run(app)
    return a, b


async def runs_and_takeovers(app) -> tuple[list[tuple[str, str]], list[dict]]:
    async def query(session):
        runs = (await session.execute(sa.select(Run.id, Run.status))).all()
        rows = await session.execute(sa.select(AuditEvent.data).where(AuditEvent.kind == "run_taken_over"))
        return [tuple(r) for r in runs], list(rows.scalars().all())

    return await app.ctx.db.run(query, read=True)


async def test_a_stalled_owner_loses_its_run_to_another_replica_which_finishes_it(bots, model, db_url):
    hung = asyncio.Event()
    model.script(text("late answer from A", until=hung), text("answer from B"))
    a, b = await two_replicas(bots, db_url)
    assert await a.core.accept_message(message("hello"))
    await model.wait_for_requests(1)  # A's model call is in flight and hangs

    await b.sweeper.sweep()  # B: A's lease has expired -> take over, drive, answer
    await b.ctx.tasks.idle()
    hung.set()  # A's call answers late; A's writes must change nothing
    await a.ctx.tasks.idle()
    await settle(a, b)

    runs, takeovers = await runs_and_takeovers(a)
    assert [status for _, status in runs] == ["done"]
    assert a.ctx.channels[PLATFORM].replies + b.ctx.channels[PLATFORM].replies == ["answer from B"]
    assert [t.get("previous_owner") for t in takeovers] == [a.ctx.replica_id]
    assert len(model.requests) == 2


async def test_a_taken_over_run_that_pauses_on_an_approval_resumes_and_executes_once(bots, model, db_url):
    hung = asyncio.Event()
    stages = Stages()
    model.script(calls(("store_note", {"topic": "x"}), until=hung), calls(("store_note", {"topic": "x"})), text("Stored."))
    a, b = await two_replicas(bots, db_url, stages)
    assert await a.core.accept_message(message("store a note"))
    await model.wait_for_requests(1)

    await b.sweeper.sweep()  # B takes over and pauses the run on B's card
    await b.ctx.tasks.idle()
    hung.set()
    await a.ctx.tasks.idle()
    cards = b.ctx.channels[PLATFORM].cards
    assert len(cards) == 1 and a.ctx.channels[PLATFORM].cards == []  # A's late proposal was fenced off

    outcome = await a.core.decide(DecisionRequest(cards[0].approval_id, ALICE, approve=True))
    assert outcome.changed
    # A executes, resumes and answers before anyone sweeps: to B (clock ahead) every lease of A has
    # run out, so a sweep of B while A still worked would take the resumed run over once more.
    await a.ctx.tasks.idle()
    await settle(a, b)
    assert stages.runs == [cards[0].approval_id]
    replies = a.ctx.channels[PLATFORM].replies + b.ctx.channels[PLATFORM].replies
    assert replies == ["Stored."]
    runs, _ = await runs_and_takeovers(a)
    assert [s for _, s in runs] == ["done"]
