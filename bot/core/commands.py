"""In-chat commands, answered before the model sees anything: `help`/`帮助`, `pending`/`待审批`,
`cancel`/`取消` (typed in a thread or a DM, the Slack `/chatops` slash command, the Feishu bot menu).

- `help` lists the tools this channel offers (its `[[channels]]` tool set), one line each, with
  the approval rule a call falls under;
- `pending` returns the caller's pending approvals, as requester and as someone who may decide
  them, as `CardView`s the adapter re-posts with working buttons (clicks take the usual path);
- `cancel` stops the conversation's run and cancels its pending approvals, each with one
  conditional UPDATE of the approval service (`ApprovalService.cancel_pending`) and an audit row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
from sqlmodel import col

from bot.core import outbox, run_rows, texts
from bot.core.approvals import editors_of
from bot.core.cards import card_view
from bot.core.channels import CardView
from bot.core.events import Thread, User
from storage.models import Approval, ApprovalStatus, Conversation, Run, RunStatus

if TYPE_CHECKING:
    from bot.core.engine import Core

log = logging.getLogger("chatops.commands")

Command = Literal["help", "pending", "cancel"]
WORDS: dict[str, Command] = {
    "help": "help",
    "帮助": "help",
    "pending": "pending",
    "待审批": "pending",
    "cancel": "cancel",
    "取消": "cancel",
    "stop": "cancel",
}
PENDING_SCAN_LIMIT = 500
PENDING_SHOWN = 10
_RULE_WORDS = {
    "auto": texts.RULE_AUTO,
    "confirm": texts.RULE_CONFIRM,
    "approve": texts.RULE_APPROVE,
    "two_person": texts.RULE_TWO_PERSON,
    "deny": texts.RULE_DENY,
}


SLASH = "/chatops"


def parse(text: str | None) -> Command | None:
    """The command a whole message is, or None (then it goes to the model)."""
    if not text:
        return None
    word = text.strip().lower()
    if word.startswith(SLASH):  # the help names `/chatops pending`: typed as a message, it is the same command
        word = word.removeprefix(SLASH)
    return WORDS.get(word.strip().strip("/!！。.").strip())


@dataclass(frozen=True)
class Reply:
    """What the adapter shows the caller: a text and, for `pending`, the cards to re-post."""

    text: str
    cards: list[CardView] = field(default_factory=list)


@dataclass(frozen=True)
class Where:
    """Where a command was given: the platform's channel id, and the conversation when in one."""

    platform: str
    channel_id: str | None
    conversation_key: str | None = None
    thread: Thread | None = None


async def run(core: Core, command: Command, user: User, where: Where) -> Reply:
    """Answer one command in the current language (the adapter has called `language.speak_with`)."""
    if command == "help":
        return Reply(help_text(core, user, where))
    if command == "pending":
        return await pending(core, user)
    return await cancel(core, user, where)


# ---------------------------------------------------------------------- help
def help_text(core: Core, user: User, where: Where) -> str:
    """The tools allowed here, one line each with their rule, then the commands."""
    ctx = core.ctx
    setup = ctx.policy.channel_setup(where.platform, where.channel_id, user.tenant)
    lines = [str(texts.HELP_TITLE)]
    for spec in sorted(setup.specs(ctx.registry), key=lambda s: s.name):
        rule = _RULE_WORDS[ctx.policy.rule_for(spec, {}).rule]
        description = spec.description.strip().splitlines()[0] if spec.description.strip() else spec.name
        lines.append(texts.HELP_LINE.format(tool=spec.name, description=description, rule=rule))
    if len(lines) == 1:
        lines = [str(texts.HELP_NO_TOOLS)]
    lines.append(str(texts.HELP_COMMANDS))
    return "\n".join(lines)


# ---------------------------------------------------------------------- pending
async def pending_approvals(core: Core, user: User) -> list[tuple[Approval, str]]:
    """Pending approvals on the user's platform they asked for, or may decide; with their role."""
    ctx = core.ctx
    async with ctx.db.transaction(read=True) as session:
        rows = (
            (
                await session.execute(
                    sa.select(Approval)
                    .where(
                        col(Approval.status) == ApprovalStatus.PENDING,
                        col(Approval.platform) == user.platform,
                        col(Approval.expires_at) > ctx.clock(),
                    )
                    .order_by(col(Approval.created_at))
                    .limit(PENDING_SCAN_LIMIT)
                )
            )
            .scalars()
            .all()
        )
    found: list[tuple[Approval, str]] = []
    for approval in rows:
        requester = User.from_dict(approval.requester)
        if requester.key == user.key:
            found.append((approval, "requester"))
        elif ctx.policy.may_decide(
            core.approvals.rule_for(approval), requester, user, list(approval.votes or []), editors_of(approval)
        ).allowed:
            found.append((approval, "approver"))
    return found


async def pending(core: Core, user: User) -> Reply:
    found = await pending_approvals(core, user)
    if not found:
        return Reply(str(texts.PENDING_NONE))
    lines = [texts.PENDING_TITLE.format(count=len(found))]
    for approval, role in found[:PENDING_SHOWN]:
        view = card_view(approval)
        lines.append(
            texts.PENDING_LINE.format(
                approval_id=approval.id,
                tool=approval.tool_name,
                summary=view.summary,
                role=texts.ROLE_REQUESTER if role == "requester" else texts.ROLE_APPROVER,
                at=texts.when(approval.expires_at),
            )
        )
    return Reply("\n".join(lines), [card_view(a) for a, _ in found[:PENDING_SHOWN]])


# ---------------------------------------------------------------------- cancel
async def latest_conversation(core: Core, user: User) -> str | None:
    """The conversation of the user's most recent unfinished run (a menu click names no thread)."""
    async with core.ctx.db.transaction(read=True) as session:
        runs = (
            (
                await session.execute(
                    sa.select(Run)
                    .where(col(Run.platform) == user.platform, col(Run.status).in_(("running", "waiting")))
                    .order_by(col(Run.created_at).desc())
                    .limit(PENDING_SCAN_LIMIT)
                )
            )
            .scalars()
            .all()
        )
    return next((r.conversation_key for r in runs if User.from_dict(r.requester).key == user.key), None)


async def cancel(core: Core, user: User, where: Where) -> Reply:
    """Stop the conversation's run and cancel its pending approvals (audited); refresh their cards."""
    if where.conversation_key is None:
        return Reply(str(texts.MENU_NO_CONVERSATION))
    stopped, cancelled = await cancel_conversation(core, where.conversation_key, user)
    if not stopped and not cancelled:
        return Reply(str(texts.CANCEL_NOTHING))
    return Reply(texts.CANCEL_DONE.format(count=len(cancelled)))


async def cancel_conversation(core: Core, conversation_key: str, user: User) -> tuple[str | None, list[str]]:
    """(the stopped run's id, the cancelled approval ids). The reason is stored in English and
    shown in each reader's language (`texts.localize`). Messages held behind the run's cards
    start a run of their own."""
    ctx = core.ctx
    reason = texts.english(texts.CANCELLED_REASON).format(who=user.label)
    async with ctx.db.transaction(urgent=True) as session:
        conv = await session.get(Conversation, conversation_key)
        run = await session.get(Run, conv.active_run_id) if conv is not None and conv.active_run_id else None
        if conv is None or run is None or run.status not in (RunStatus.RUNNING, RunStatus.WAITING):
            return None, []
        gone = await core.approvals.cancel_pending(session, col(Approval.run_id) == run.id, reason, actor=user.key)
        cancelled = [a.id for a in gone]
        await session.execute(
            sa.update(Run)
            .where(col(Run.id) == run.id, col(Run.status).in_((RunStatus.RUNNING, RunStatus.WAITING)))
            .values(status=RunStatus.CANCELLED, lease_until=None, updated_at=ctx.clock())
        )
        await run_rows.done(session, run.id)
        more = await run_rows.release_held(session, conversation_key)  # waiting behind this run's cards
        conv.active_run_id = None
        conv.version += 1
        await outbox.enqueue_progress(session, ctx, run.thread, str(texts.PROGRESS_STOPPED), run_id=run.id, edit_only=True)
        await ctx.audit.record(
            session,
            "run_cancelled",
            run_id=run.id,
            platform=user.platform,
            actor=user.key,
            status="cancelled",
            cancelled=cancelled,
        )
    log.info("run %s cancelled by %s (%d approvals)", run.id, user.key, len(cancelled))
    if more:
        core.start_conversation(conversation_key)
    return run.id, cancelled
