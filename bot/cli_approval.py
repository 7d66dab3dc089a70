"""`chatops approval show ID`: one approval's card with every argument in full (sync, read-only).

The fallback the chat cards point to when a request is too long for the platform (a Slack modal
holds 100 blocks, a Feishu card 30 KB): the same neutralised display as the terminal card.
"""

from __future__ import annotations

import sys
from typing import TextIO

from sqlalchemy.orm import Session

from bot.core.cards import card_view
from bot.core.errors import ChatopsError
from bot.terminal import render_card
from storage.engine import make_sync_engine, normalise_url
from storage.models import Approval


def approval_show(database_url: str, approval_id: str, out: TextIO | None = None) -> None:
    """Print the approval's card, every frozen argument complete (markers as on the chat card)."""
    out = out or sys.stdout
    if not approval_id or len(approval_id) > 40 or "\x00" in approval_id:
        raise ChatopsError(f"{approval_id[:60]!r} is not an approval id (like ap-abc123)")
    with Session(make_sync_engine(normalise_url(database_url))) as session:
        approval = session.get(Approval, approval_id)
        if approval is None:
            raise ChatopsError(f"no approval {approval_id!r}")
        out.write(render_card(card_view(approval)) + "\n")
