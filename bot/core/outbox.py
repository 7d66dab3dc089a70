"""Channel output for the core: posting and refreshing approval cards, replies and notices.

Every call to a platform goes through here, so a platform outage is logged once and never loses
state: an approval whose card could not be posted stays decidable, a refresh shows the stored state.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

from bot.core.cards import card_view
from bot.core.context import AppContext
from bot.core.events import Thread
from storage.models import Approval

log = logging.getLogger("chatops.outbox")


class Outbox:
    """Renders stored approvals and texts through the channel adapters."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    async def post_card(self, approval_id: str) -> None:
        ctx = self.ctx
        async with ctx.db.transaction() as session:
            approval = await session.get(Approval, approval_id)
        if approval is None:
            return
        channel = ctx.channel(approval.platform)
        if channel is None:
            return
        thread = Thread.from_dict(approval.thread)
        try:
            message_id = await channel.post_card(thread, card_view(approval))
        except Exception:
            log.exception("posting the card for %s failed", approval_id)
            message_id = None
        async with ctx.db.transaction() as session:
            if message_id:
                await session.execute(sa.update(Approval).where(Approval.id == approval_id).values(card_message_id=message_id))
            await ctx.audit.record(
                session,
                "card_posted",
                run_id=approval.run_id,
                approval_id=approval_id,
                platform=approval.platform,
                tool=approval.tool_name,
                status="posted" if message_id else "not_posted",
                message_id=message_id,
            )
        if message_id:
            # The decision may have raced ahead of the post: make the card show the current state.
            async with ctx.db.transaction() as session:
                latest = await session.get(Approval, approval_id)
            if latest is not None and latest.status != "pending":
                await self.refresh_card(approval_id)

    async def refresh_card(self, approval_id: str) -> None:
        """Re-render a posted card from the approval's current state."""
        ctx = self.ctx
        async with ctx.db.transaction() as session:
            approval = await session.get(Approval, approval_id)
        if approval is None or not approval.card_message_id:
            return
        channel = ctx.channel(approval.platform)
        if channel is None:
            return
        try:
            await channel.update_card(Thread.from_dict(approval.thread), approval.card_message_id, card_view(approval))
        except Exception:
            log.exception("updating the card for %s failed", approval_id)

    async def notify(self, thread: Thread, text: str) -> bool:
        channel = self.ctx.channel(thread.platform)
        if channel is None:
            log.warning("no %s channel is running; a reply could not be delivered", thread.platform)
            return False
        try:
            await channel.post_reply(thread, self.ctx.redactor.redact_text(text))
            return True
        except Exception:
            log.exception("posting a reply on %s failed", thread.platform)
            return False

    async def channel_call(self, thread: Thread, method: str) -> None:
        channel = self.ctx.channel(thread.platform)
        if channel is None:
            return
        try:
            await getattr(channel, method)(thread)
        except Exception:  # noqa: BLE001
            log.warning("%s on %s failed", method, thread.platform)
