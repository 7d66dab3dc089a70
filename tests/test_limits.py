"""Per-user limits under a burst: ten simultaneous messages from one user (each in its own thread)
against `requests_per_minute = 2` and `max_pending_approvals = 2`. On SQLite with one bot, and on
PostgreSQL with two replicas on one database taking the messages in turn."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from bot.app import App
from bot.core import texts
from tests.fakes.openai_server import Reply, calls, text
from tests.fault_helpers import FaultChannel, Stages, message, settle, summary

BURST = 10


async def start_replicas(bots, db_url: str, tmp_path: Path, limits: str) -> tuple[list[App], list[FaultChannel]]:
    policy = tmp_path / "policy.toml"
    policy.write_text(f"[limits]\n{limits}\n", encoding="utf-8")
    replicas = 2 if db_url.startswith("postgresql") else 1
    apps, channels = [], []
    for _ in range(replicas):
        app = await bots.start(toolsets=[Stages().toolset()], database_url=db_url, CHATOPS_POLICY=str(policy))
        channel = FaultChannel()
        app.ctx.channels[channel.platform] = channel
        await bots.run(app)
        apps.append(app)
        channels.append(channel)
    return apps, channels


async def burst(apps: list[App]) -> None:
    msgs = [message(f"request {i}") for i in range(BURST)]
    await asyncio.gather(*(apps[i % len(apps)].core.accept_message(m) for i, m in enumerate(msgs)))
    await settle(*apps)


def replies(channels: list[FaultChannel]) -> list[str]:
    return [r for c in channels for r in c.replies]


async def test_requests_per_minute_admits_exactly_the_limit_under_a_burst(bots, model, db_url, tmp_path):
    model.responder = lambda body: text("done")
    apps, channels = await start_replicas(bots, db_url, tmp_path, "requests_per_minute = 2")
    await burst(apps)
    said = replies(channels)
    assert said.count("done") == 2, said
    assert said.count(texts.RATE_LIMITED.format(limit=2)) == BURST - 2, said
    state = await summary(apps[0])
    assert state.inbox["refused"] == BURST - 2 and len(model.requests) == 2
    assert state.stuck == []


def propose_or_finish(body: dict[str, Any]) -> Reply:
    if body["messages"][-1]["role"] == "tool":
        return text("finished")
    return calls(("store_note", {"topic": "x"}))


async def test_max_pending_approvals_holds_under_a_burst(bots, model, db_url, tmp_path):
    model.responder = propose_or_finish
    apps, channels = await start_replicas(bots, db_url, tmp_path, "max_pending_approvals = 2")
    await burst(apps)
    state = await summary(apps[0])
    assert sorted(state.approvals.values()) == ["pending", "pending"], state.approvals
    refusal = re.escape(texts.TOO_MANY_PENDING.format(count=2))
    said = replies(channels)
    assert sum(1 for r in said if re.fullmatch(refusal, r)) == BURST - 2, said
    assert sum(len(c.cards) for c in channels) == 2
    assert state.stuck == []
