"""`Core`: the one channel-agnostic entry point the adapters call.

- `accept_message` records an inbound message durably (deduplicated across replicas) and
  schedules the agent; it returns in milliseconds so the adapter can ack at once.
- `decide` applies an Approve/Reject click and returns at once with what the clicker should
  see; execution and the resumed agent run happen in the background, cards through the outbox.
- `open_edit` / `edit`: the form for an Edit click, and a submitted edit (a new revision of the
  frozen call, or the problems by field); the card update goes through the outbox.

Where "the background" is depends on how the Core was built: in one process (`wake=None`, the
terminal chat, tests) it spawns the work as tasks of this process; in the front process of
`chatops serve --workers N` (`wake` given) it only signals the worker processes, which claim the
work from the database (`Sweeper.pick_up`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import OperationalError
from sqlmodel import col

from bot.core import card_copies, outbox
from bot.core.approvals import ApprovalService, Decision, DecisionOutcome, EditOutcome
from bot.core.cards import card_view
from bot.core.context import AppContext
from bot.core.errors import StorageError
from bot.core.events import DecisionRequest, EditRequest, IncomingMessage, Thread, User
from bot.core.executor import Executor
from bot.core.intake import Intake
from bot.core.outbox import Outbox
from bot.core.run_store import RunStore
from bot.core.runner import Runner
from storage.engine import LockBusy, is_transient
from storage.models import Approval, ApprovalStatus, InboxEvent
from storage.sessions import DbSession

log = logging.getLogger("chatops.core")
CARD_ANSWER_GRACE = 1.0  # seconds: a click's answer reaches the platform well within this


@contextmanager
def _storage_fault(what: str) -> Iterator[None]:
    """A database fault an adapter must answer (503, "click again") raised as `StorageError(what)`:
    an operational error, a busy lock, any transient fault (a dropped connection, a stalled transaction)."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, OperationalError | LockBusy) or is_transient(exc):
            raise StorageError(f"{what}: {type(exc).__name__}") from None
        raise


class Core:
    """The bot's core; one per process (or per simulated replica in tests). With `wake`, work is
    not run here: `wake()` tells the worker processes to claim it (it must not block)."""

    def __init__(self, ctx: AppContext, wake: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self.wake = wake
        self.approvals = ApprovalService(ctx)
        self.out = Outbox(ctx, self.approvals)
        self.store = RunStore(ctx, self.approvals)
        self.runner = Runner(ctx, self.store, self.out)
        self.executor = Executor(ctx, self.approvals)
        self.intake = Intake(ctx)
        self.out.on_card_given_up.append(lambda approval: self.resume_later(approval.run_id))
        ctx.db.after_commit("outbox_queued", wake or self.out.kick)
        if ctx.delivers_outbox:
            ctx.db.after_commit_value("outbox_born", self.out.deliver_claimed)

    # ------------------------------------------------------------------ inbound messages
    async def accept_message(self, msg: IncomingMessage) -> bool:
        """Record `msg` once. True if new (the agent will run), False for a duplicate delivery.

        Raises StorageError when the message could not be recorded (the database is away or its
        lock stayed busy for about a second): the adapter must then answer the platform with an
        error so it redelivers (never ack what was not stored)."""
        with _storage_fault("could not record the message"):
            if not await self.intake.record(msg):
                return False
        self.start_conversation(msg.conversation_key)
        return True

    def start_conversation(self, key: str) -> None:
        if self.wake is not None:
            self.wake()
            return
        self.ctx.tasks.spawn(self.runner.process_conversation(key), name=f"conversation-{key}")

    # ------------------------------------------------------------------ decisions
    async def decide(self, req: DecisionRequest) -> DecisionOutcome:
        """Apply a click. The returned outcome says what the clicker should see; nothing slow runs here."""
        with _storage_fault("could not record the decision"):
            outcome = await self.approvals.decide(req)
        if outcome.changed and outcome.approval is not None:
            approval = outcome.approval
            if outcome.kind == Decision.APPROVED and self.wake is not None:
                self.wake()
            elif outcome.kind == Decision.APPROVED:
                self.ctx.tasks.spawn(self._execute_then_resume(approval.id, approval.run_id), name=f"execute-{approval.id}")
            else:
                self.resume_later(approval.run_id)
        if outcome.approval is not None:
            outcome = dataclasses.replace(outcome, card=card_view(outcome.approval))
        return outcome

    async def open_edit(self, req: EditRequest) -> EditOutcome:
        """An Edit click: the form with the frozen arguments, or why this person may not edit."""
        return self._with_card(await self._storing(self.approvals.open_edit(req)))

    async def edit(self, req: EditRequest) -> EditOutcome:
        """A submitted edit: stored as the call's next revision, or refused with the problems by field."""
        return self._with_card(await self._storing(self.approvals.edit(req)))

    @staticmethod
    async def _storing(step: Awaitable[EditOutcome]) -> EditOutcome:
        with _storage_fault("could not record the edit"):
            return await step

    @staticmethod
    def _with_card(outcome: EditOutcome) -> EditOutcome:
        if outcome.approval is None:
            return outcome
        return dataclasses.replace(outcome, card=card_view(outcome.approval))

    async def card_answered(self, approval_id: str) -> None:
        """A click is about to be answered with the card as it is now (Feishu shows that answer in place
        of the card). Where other processes deliver card updates, one of theirs could land just before
        that answer and be covered by it: queue one more refresh, due a moment later, which renders the
        state at delivery time. In one process the adapter orders its own updates after the answer."""
        if self.wake is None:
            return

        async def queue(session: DbSession) -> None:
            approval = await session.get(Approval, approval_id)
            if approval is not None:
                await outbox.enqueue_card_update(session, self.ctx, approval, after=CARD_ANSWER_GRACE)

        try:
            await self.ctx.db.run(queue, urgent=True)
        except Exception as exc:  # noqa: BLE001 - the card then shows the state at the click until its next update
            log.warning("could not queue a refresh of the card of %s: %s", approval_id, type(exc).__name__)

    async def card_copied(self, approval_id: str, thread: Thread, message_id: str) -> None:
        """A copy of an approval's card was posted at `message_id` (a `pending` answer): later renderings
        patch it too. A decision that came meanwhile queues one more rendering, which reaches the copy."""

        async def store(session: DbSession) -> None:
            card_copies.add(session, approval_id, thread, message_id, self.ctx.clock())
            approval = await session.get(Approval, approval_id)
            if approval is not None and approval.status != ApprovalStatus.PENDING:
                await outbox.enqueue_card_update(session, self.ctx, approval)

        try:
            await self.ctx.db.run(store)
        except Exception as exc:  # noqa: BLE001 - the copy then keeps the state it was posted with
            log.warning("could not record a copy of the card of %s: %s", approval_id, type(exc).__name__)

    async def _execute_then_resume(self, approval_id: str, run_id: str) -> None:
        await self.executor.execute(approval_id)
        await self.runner.resume(run_id)

    def resume_later(self, run_id: str) -> None:
        """Resume a waiting run in the background if its approvals are all decided."""
        if self.wake is not None:
            self.wake()
            return
        self.ctx.tasks.spawn(self.runner.resume(run_id), name=f"resume-{run_id}")

    # ------------------------------------------------------------------ queries and shutdown
    async def pending_for(self, conversation_key: str) -> list[Approval]:
        """Approvals still waiting in a conversation (the terminal lists them)."""

        async def query(session: DbSession) -> list[Approval]:
            rows = await session.execute(
                sa.select(Approval)
                .where(
                    col(Approval.status) == ApprovalStatus.PENDING,
                    col(Approval.run_id).in_(
                        sa.select(col(InboxEvent.run_id)).where(col(InboxEvent.conversation_key) == conversation_key)
                    ),
                )
                .order_by(col(Approval.created_at))
            )
            return list(rows.scalars().all())

        return await self.ctx.db.run(query, read=True)

    async def pending_of(self, user: User) -> list[Approval]:
        """Approvals waiting on a decision that `user` asked for."""

        async def query(session: DbSession) -> list[Approval]:
            rows = await session.execute(
                sa.select(Approval)
                .where(
                    col(Approval.status) == ApprovalStatus.PENDING,
                    col(Approval.requester_id) == user.id,
                    col(Approval.platform) == user.platform,
                )
                .order_by(col(Approval.created_at))
            )
            return list(rows.scalars().all())

        return await self.ctx.db.run(query, read=True)

    async def hand_back(self) -> None:
        """On shutdown: release this replica's run leases so another replica continues them at once."""
        try:
            released = await self.store.hand_back()
            if released:
                log.info("handed %d run(s) back for another replica to continue", released)
        except Exception as exc:  # noqa: BLE001 - the leases simply run out
            log.warning("could not hand runs back (%s); their leases will run out", type(exc).__name__)
