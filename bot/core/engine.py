"""`Core`: the one channel-agnostic entry point the adapters call.

- `accept_message` records an inbound message durably (deduplicated across replicas) and
  schedules the agent; it returns in milliseconds so the adapter can ack at once.
- `decide` applies an Approve/Reject click and returns at once with what the clicker should
  see; card updates, execution and the resumed agent run happen in the background.
"""

from __future__ import annotations

import logging
import uuid

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from bot.core import approvals
from bot.core.approvals import DecisionOutcome
from bot.core.context import AppContext
from bot.core.errors import StorageError
from bot.core.events import DecisionRequest, IncomingMessage
from bot.core.executor import Executor
from bot.core.policy import CallRule
from bot.core.runner import Runner
from storage.models import Approval, InboxEvent, SeenKey

log = logging.getLogger("chatops.core")


class Core:
    """The bot's core; one per process (or per simulated replica in tests)."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.runner = Runner(ctx)
        self.executor = Executor(ctx, self.rule_for)

    def rule_for(self, approval: Approval) -> CallRule:
        """The current policy rule for a stored approval (tools that vanished count as writes)."""
        spec = self.ctx.registry.get(approval.tool_name)
        if spec is None:
            return CallRule("confirm", "tool no longer registered")
        return self.ctx.policy.rule_for(spec, approval.args)

    # ------------------------------------------------------------------ inbound messages
    async def accept_message(self, msg: IncomingMessage) -> bool:
        """Record `msg` once. True if new (the agent will run), False for a duplicate delivery.

        Raises StorageError when the message could not be recorded: the adapter must then answer
        the platform with an error so it redelivers (never ack what was not stored).
        """
        ctx = self.ctx
        inbox_id = "in-" + uuid.uuid4().hex[:16]
        now = ctx.clock()
        try:
            async with ctx.db.transaction(urgent=True) as session:
                # Plain INSERTs (no ORM unit of work): this is the ack path. A key seen before -> IntegrityError.
                keys = [{"key": k[:300], "inbox_id": inbox_id, "created_at": now} for k in msg.dedupe_keys]
                await session.execute(sa.insert(SeenKey), keys)
                await session.execute(
                    sa.insert(InboxEvent).values(
                        id=inbox_id,
                        platform=msg.thread.platform,
                        conversation_key=msg.conversation_key,
                        payload=ctx.redactor.redact(msg.to_dict()),  # a pasted secret is never stored
                        status="queued",
                        created_at=now,
                        updated_at=now,
                    )
                )
                await ctx.audit.record(
                    session,
                    "request_received",
                    platform=msg.user.platform,
                    actor=msg.user.key,
                    status="queued",
                    inbox_id=inbox_id,
                    conversation=msg.conversation_key,
                    text=msg.text,
                    keys=list(msg.dedupe_keys),
                )
        except IntegrityError:
            return False
        except OperationalError as exc:
            raise StorageError(f"could not record the message: {type(exc.orig).__name__}") from None
        ctx.tasks.spawn(self.runner.process_conversation(msg.conversation_key), name=f"conversation-{msg.conversation_key}")
        return True

    # ------------------------------------------------------------------ decisions
    async def decide(self, req: DecisionRequest) -> DecisionOutcome:
        """Apply a click. The returned outcome says what the clicker should see; nothing slow runs here."""
        outcome = await approvals.decide(self.ctx, req, self.rule_for)
        if outcome.changed and outcome.approval is not None:
            self.ctx.tasks.spawn(self._after_decision(outcome), name=f"after-{req.approval_id}")
        return outcome

    async def _after_decision(self, outcome: DecisionOutcome) -> None:
        approval = outcome.approval
        assert approval is not None
        await self.runner.out.refresh_card(approval.id)
        if outcome.kind == "approved":
            await self.executor.execute(approval.id)
            await self.runner.out.refresh_card(approval.id)
        await self.runner.resume_if_ready(approval.run_id)

    # ------------------------------------------------------------------ queries
    async def pending_for(self, conversation_key: str) -> list[Approval]:
        """Approvals still waiting in a conversation (the terminal lists them)."""
        async with self.ctx.db.transaction() as session:
            rows = await session.execute(
                sa.select(Approval)
                .join(InboxEvent, InboxEvent.run_id == Approval.run_id)
                .where(InboxEvent.conversation_key == conversation_key, Approval.status == "pending")
                .order_by(Approval.created_at)
            )
            return list(dict.fromkeys(rows.scalars().all()))
