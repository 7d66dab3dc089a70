"""Copies of an approval's card posted outside its thread (a `pending` answer re-posts each pending
card, with working buttons): stored, so that every later rendering of the card patches them too and no
copy goes on showing a decided request as pending. The outbox patches them (`outbox`); the engine
records them (`Core.card_copied`)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import col

from bot.core.events import Thread
from storage.models import CardCopy
from storage.sessions import DbSession

MAX_COPIES = 20  # per approval: the newest are patched; older copies keep their last rendering


def add(session: DbSession, approval_id: str, thread: Thread, message_id: str, now: datetime) -> None:
    session.add(
        CardCopy(
            approval_id=approval_id, platform=thread.platform, message_id=message_id, thread=thread.to_dict(), created_at=now
        )
    )


async def of(session: DbSession, approval_id: str) -> list[CardCopy]:
    """The newest copies of an approval's card, newest first."""
    rows = await session.execute(
        sa.select(CardCopy).where(col(CardCopy.approval_id) == approval_id).order_by(col(CardCopy.id).desc()).limit(MAX_COPIES)
    )
    return list(rows.scalars())
