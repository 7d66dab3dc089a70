"""A person's home view (Slack's App Home tab): their pending approvals, as requester and as someone
who may decide them, and their recent runs. Platform-neutral: the adapter renders `HomeView`.

- `home_for` builds the view from the database at the moment it is published;
- who is shown a change (`home_audience.concerned`) gets a `home_refresh` outbox job, coalesced
  (`outbox.enqueue_home_refresh`), and the adapter re-publishes their home when it is delivered.

Buttons on the home view carry the approval id like the card's, and go through `Core.decide`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlmodel import col

from bot.core import commands
from bot.core.cards import card_view
from bot.core.channels import CardView
from bot.core.context import AppContext
from bot.core.events import User
from storage.models import InboxEvent, Run
from storage.sessions import DbSession

if TYPE_CHECKING:
    from bot.core.engine import Core

RECENT_RUNS = 5
RUN_SCAN_LIMIT = 500
REQUEST_LIMIT = 200


@dataclass(frozen=True)
class RecentRun:
    """One of the person's recent requests: what they asked, when, and how it ended (or stands)."""

    run_id: str
    asked: str
    status: str
    at: datetime


@dataclass(frozen=True)
class HomeView:
    """What a person's home shows: pending cards with their role on each, then recent runs."""

    user: User
    pending: tuple[tuple[CardView, str], ...]
    recent: tuple[RecentRun, ...]


async def home_for(core: Core, user: User) -> HomeView:
    """The home view of `user` now (the current language is theirs: the adapter made it current)."""
    found = await commands.pending_approvals(core, user)
    pending = tuple((card_view(a), role) for a, role in found[: commands.PENDING_SHOWN])
    return HomeView(user, pending, tuple(await recent_runs(core.ctx, user)))


async def recent_runs(ctx: AppContext, user: User) -> list[RecentRun]:
    """The person's latest runs on their platform, newest first, with the text that started each."""
    async with ctx.db.transaction(read=True) as session:
        runs = (
            (
                await session.execute(
                    sa.select(Run)
                    .where(col(Run.platform) == user.platform)
                    .order_by(col(Run.created_at).desc())
                    .limit(RUN_SCAN_LIMIT)
                )
            )
            .scalars()
            .all()
        )
        mine = [r for r in runs if (r.requester or {}).get("id") == user.id][:RECENT_RUNS]
        asked = await _first_texts(session, [r.id for r in mine])
    return [RecentRun(r.id, asked.get(r.id, ""), r.status, r.created_at) for r in mine]


async def _first_texts(session: DbSession, run_ids: list[str]) -> dict[str, str]:
    if not run_ids:
        return {}
    rows = await session.execute(
        sa.select(col(InboxEvent.run_id), col(InboxEvent.payload))
        .where(col(InboxEvent.run_id).in_(run_ids))
        .order_by(col(InboxEvent.created_at))
    )
    texts: dict[str, str] = {}
    for run_id, payload in rows.all():
        texts.setdefault(str(run_id), str((payload or {}).get("text") or "")[:REQUEST_LIMIT])
    return texts
