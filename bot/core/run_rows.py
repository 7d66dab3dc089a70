"""The run store's statements on the run, conversation and inbox rows, and the small records they
read. Prepared once at import (`storage.prepared`) and run with bound parameters: a turn's start,
steps and finish go without the ORM's unit of work and SQLAlchemy's per-execution layers, which cost
more than the statements themselves.

Every write of a run's own row is fenced by the claim's version (`mine`): a replica that lost its
lease changes nothing. A conversation's row is written by whoever holds it (`active_run_id`), and
claimed or released with `version + 1`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from bot.core.events import IncomingMessage
from storage.models import Conversation, InboxEvent, InboxStatus, Run, RunStatus, table_of
from storage.prepared import Prepared
from storage.sessions import DbSession

R, Q = RunStatus, InboxStatus
# Bound names are not column names: SQLAlchemy keeps those for the SET clause.
_RUNS, _CONVERSATIONS, _INBOX = table_of(Run), table_of(Conversation), table_of(InboxEvent)
_MINE_WHERE = (
    _RUNS.c.id == sa.bindparam("b_run_id"), _RUNS.c.version == sa.bindparam("b_version"), _RUNS.c.status == R.RUNNING
)  # fmt: skip
_STILL_MINE = Prepared(sa.select(_RUNS.c.id).where(*_MINE_WHERE))
_RENEW = Prepared(sa.update(_RUNS).where(*_MINE_WHERE).values(lease_until=sa.bindparam("b_lease_until")))
_ADVANCE = Prepared(
    sa.update(_RUNS)
    .where(*_MINE_WHERE)
    .values(step=sa.bindparam("b_step"), updated_at=sa.bindparam("b_now"), lease_until=sa.bindparam("b_lease_until"))
)
_END = Prepared(
    sa.update(_RUNS)
    .where(*_MINE_WHERE)
    .values(status=sa.bindparam("b_status"), step=_RUNS.c.step + sa.bindparam("b_steps"), updated_at=sa.bindparam("b_now"),
            lease_until=None)
)  # fmt: skip
_PAUSE = Prepared(
    sa.update(_RUNS)
    .where(_RUNS.c.id == sa.bindparam("b_run_id"))
    .values(status=R.WAITING, pending_results=sa.bindparam("b_results", type_=sa.JSON()))
)
_RESUME = Prepared(
    sa.update(_RUNS)
    .where(_RUNS.c.id == sa.bindparam("b_run_id"), _RUNS.c.status == R.WAITING, _RUNS.c.version == sa.bindparam("b_version"))
    .values(status=R.RUNNING, owner=sa.bindparam("b_owner"), lease_until=sa.bindparam("b_lease_until"),
            version=_RUNS.c.version + 1, updated_at=sa.bindparam("b_now"), pending_results={})
)  # fmt: skip
_SET_REQUESTER = Prepared(
    sa.update(_RUNS)
    .where(_RUNS.c.id == sa.bindparam("b_run_id"))
    .values(requester=sa.bindparam("b_requester", type_=sa.JSON()), thread=sa.bindparam("b_thread", type_=sa.JSON()))
)
_INSERT_RUN = Prepared(sa.insert(_RUNS))
# PostgreSQL: one start of a conversation at a time (a transaction lock on the conversation's key;
# SQLite's write lock already serialises every write). Workers woken by one signal all look at the
# same waiting conversations: a second start waits for the first one's commit and then finds the
# queue drained, instead of racing it to the conversation's row, failing and rolling back.
_START_LOCK = Prepared(sa.text("SELECT pg_advisory_xact_lock(:namespace, hashtext(:key))"))
_START_LOCK_NAMESPACE = 7_240_003  # beside the audit chainer's and the migrations' locks
_CONVERSATION = Prepared(
    sa.select(_CONVERSATIONS.c.messages, _CONVERSATIONS.c.active_run_id, _CONVERSATIONS.c.version).where(
        _CONVERSATIONS.c.key == sa.bindparam("b_key")
    )
)
_INSERT_CONVERSATION = Prepared(sa.insert(_CONVERSATIONS))
_CLAIM_CONVERSATION = Prepared(
    sa.update(_CONVERSATIONS)
    .where(_CONVERSATIONS.c.key == sa.bindparam("b_key"), _CONVERSATIONS.c.version == sa.bindparam("b_version"))
    .values(active_run_id=sa.bindparam("b_run_id"), version=_CONVERSATIONS.c.version + 1,
            messages=sa.bindparam("b_messages", type_=sa.JSON()), updated_at=sa.bindparam("b_now"))
)  # fmt: skip
_SAVE_MESSAGES = Prepared(
    sa.update(_CONVERSATIONS)
    .where(_CONVERSATIONS.c.key == sa.bindparam("b_key"))
    .values(messages=sa.bindparam("b_messages", type_=sa.JSON()), updated_at=sa.bindparam("b_now"))
)
_RELEASE_CONVERSATION = Prepared(
    sa.update(_CONVERSATIONS)
    .where(_CONVERSATIONS.c.key == sa.bindparam("b_key"))
    .values(
        messages=sa.bindparam("b_messages", type_=sa.JSON()),
        updated_at=sa.bindparam("b_now"),
        active_run_id=sa.case((_CONVERSATIONS.c.active_run_id == sa.bindparam("b_run_id"), sa.null()),
                              else_=_CONVERSATIONS.c.active_run_id),
        version=_CONVERSATIONS.c.version + 1,
    )
)  # fmt: skip
_QUEUED_OR_HELD = Prepared(
    sa.select(_INBOX.c.id, _INBOX.c.status, _INBOX.c.payload)
    .where(_INBOX.c.conversation_key == sa.bindparam("b_key"), _INBOX.c.status.in_((Q.QUEUED, Q.HELD)))
    .order_by(_INBOX.c.created_at, _INBOX.c.id)
)  # fmt: skip
# A start's one read: the queued messages, and on the first of them the conversation they join (its
# history only once, however many are queued; none when nothing is queued, which most looks find).
_FIRST = sa.func.row_number().over(order_by=(_INBOX.c.created_at, _INBOX.c.id)) == 1
_QUEUED_AND_CONVERSATION = Prepared(
    sa.select(
        _INBOX.c.id, _INBOX.c.status, _INBOX.c.payload,
        sa.case((_FIRST, _CONVERSATIONS.c.messages), else_=sa.null()).label("messages"),
        _CONVERSATIONS.c.active_run_id, _CONVERSATIONS.c.version,
    )
    .select_from(_INBOX.outerjoin(_CONVERSATIONS, _CONVERSATIONS.c.key == _INBOX.c.conversation_key))
    .where(_INBOX.c.conversation_key == sa.bindparam("b_key"), _INBOX.c.status == Q.QUEUED)
    .order_by(_INBOX.c.created_at, _INBOX.c.id)
)  # fmt: skip
_SET_INBOX_STATUS = Prepared(
    sa.update(_INBOX)
    .where(_INBOX.c.id == sa.bindparam("b_id"))
    .values(status=sa.bindparam("b_status"), run_id=sa.bindparam("b_run_id"), updated_at=sa.bindparam("b_now"))
)
_INBOX_DONE = Prepared(
    sa.update(_INBOX).where(_INBOX.c.run_id == sa.bindparam("b_run_id"), _INBOX.c.status == Q.RUNNING).values(status=Q.DONE)
)
_UNHOLD = Prepared(
    sa.update(_INBOX).where(_INBOX.c.conversation_key == sa.bindparam("b_key"), _INBOX.c.status == Q.HELD).values(status=Q.QUEUED)
)
_WAITING_STATUSES = Prepared(
    sa.select(_INBOX.c.status)
    .where(_INBOX.c.conversation_key == sa.bindparam("b_key"), _INBOX.c.status.in_((Q.HELD, Q.QUEUED)))
    .distinct()
)


@dataclass(frozen=True)
class ConversationRow:
    """What a run needs of its conversation: the history, who holds it, and the version that fences a claim."""

    key: str
    messages: list[dict[str, Any]]
    active_run_id: str | None
    version: int


@dataclass(frozen=True)
class QueuedMessage:
    """A message of a conversation waiting for a run (queued, or held behind others' approvals)."""

    id: str
    status: InboxStatus
    message: IncomingMessage


def new_run_id() -> str:
    return "run-" + uuid.uuid4().hex[:16]


def _mine(run_id: str, version: int) -> dict[str, Any]:
    """The bound values that fence a run's writes: still this claim's (same version, running)."""
    return {"b_run_id": run_id, "b_version": version}


# ---------------------------------------------------------------------- runs
async def insert_run(session: DbSession, **values: Any) -> None:
    await _INSERT_RUN.run(session, values)


async def still_mine(session: DbSession, run_id: str, version: int) -> bool:
    return (await _STILL_MINE.run(session, _mine(run_id, version))).first() is not None


async def renew(session: DbSession, run_id: str, version: int, lease_until: datetime) -> bool:
    return bool((await _RENEW.run(session, {**_mine(run_id, version), "b_lease_until": lease_until})).rowcount)


async def advance(session: DbSession, run_id: str, version: int, step: int, now: datetime, lease_until: datetime) -> bool:
    """The run moves to `step` and its lease is renewed; False when it is no longer this claim's."""
    values = {**_mine(run_id, version), "b_step": step, "b_now": now, "b_lease_until": lease_until}
    return bool((await _ADVANCE.run(session, values)).rowcount)


async def end(session: DbSession, run_id: str, version: int, status: RunStatus, steps: int, now: datetime) -> bool:
    """The run ends with `status` after `steps` more model calls; False when it is no longer this claim's."""
    values = {**_mine(run_id, version), "b_status": status, "b_steps": steps, "b_now": now}
    return bool((await _END.run(session, values)).rowcount)


async def pause(session: DbSession, run_id: str, results: dict[str, str]) -> None:
    """The run waits on its step's approvals, keeping the results of the calls that ran."""
    await _PAUSE.run(session, {"b_run_id": run_id, "b_results": results})


async def resume(session: DbSession, run_id: str, version: int, owner: str, lease_until: datetime, now: datetime) -> bool:
    """waiting -> running (`version + 1`) under `owner`'s lease; False when another replica resumed it first."""
    values = {"b_run_id": run_id, "b_version": version, "b_owner": owner, "b_lease_until": lease_until, "b_now": now}
    return bool((await _RESUME.run(session, values)).rowcount)


async def set_requester(session: DbSession, run_id: str, requester: dict[str, Any], thread: dict[str, Any]) -> None:
    """What follows answers a newer message: its author is the requester, its thread the place to answer."""
    await _SET_REQUESTER.run(session, {"b_run_id": run_id, "b_requester": requester, "b_thread": thread})


# ---------------------------------------------------------------------- conversations
async def conversation(session: DbSession, key: str) -> ConversationRow | None:
    row = (await _CONVERSATION.run(session, {"b_key": key})).first()
    return None if row is None else ConversationRow(key, list(row.messages or []), row.active_run_id, row.version)


async def create_conversation(
    session: DbSession, key: str, platform: str, messages: list[dict[str, Any]], run_id: str | None, now: datetime
) -> None:
    """A new conversation, held by `run_id` (an `IntegrityError` when another replica created it meanwhile)."""
    values = {"key": key, "platform": platform, "messages": messages, "active_run_id": run_id, "version": 1, "updated_at": now}
    await _INSERT_CONVERSATION.run(session, values)


async def claim_conversation(
    session: DbSession, conv: ConversationRow, run_id: str | None, messages: list[dict[str, Any]], now: datetime
) -> bool:
    """Hold the conversation for `run_id` with its new history, unless it changed since `conv` was read."""
    values = {"b_key": conv.key, "b_version": conv.version, "b_run_id": run_id, "b_messages": messages, "b_now": now}
    return bool((await _CLAIM_CONVERSATION.run(session, values)).rowcount)


async def save_messages(session: DbSession, key: str, messages: list[dict[str, Any]], now: datetime) -> None:
    await _SAVE_MESSAGES.run(session, {"b_key": key, "b_messages": messages, "b_now": now})


async def release_conversation(session: DbSession, key: str, run_id: str, messages: list[dict[str, Any]], now: datetime) -> None:
    """Store the history and let go of the conversation, if `run_id` holds it."""
    await _RELEASE_CONVERSATION.run(session, {"b_key": key, "b_run_id": run_id, "b_messages": messages, "b_now": now})


# ---------------------------------------------------------------------- inbox
async def lock_for_start(session: DbSession, key: str) -> None:
    """Wait until no other transaction is starting a run of this conversation (held until commit)."""
    if session.bind.dialect.name == "postgresql":
        await _START_LOCK.run(session, {"namespace": _START_LOCK_NAMESPACE, "key": key})


def _queued_message(row: Any) -> QueuedMessage:
    return QueuedMessage(row.id, InboxStatus(row.status), IncomingMessage.from_dict(row.payload))


async def queued_or_held(session: DbSession, key: str) -> list[QueuedMessage]:
    """The conversation's messages waiting for a run (queued, or held behind approvals), oldest first."""
    return [_queued_message(row) for row in (await _QUEUED_OR_HELD.run(session, {"b_key": key})).all()]


async def queued_and_conversation(session: DbSession, key: str) -> tuple[list[QueuedMessage], ConversationRow | None]:
    """The conversation's queued messages, oldest first, and the conversation itself (None when it has
    no row yet, or when nothing is queued: then it is not needed), in one statement."""
    rows = (await _QUEUED_AND_CONVERSATION.run(session, {"b_key": key})).all()
    queued = [_queued_message(row) for row in rows]
    first = rows[0] if rows else None
    if first is None or first.version is None:
        return queued, None
    return queued, ConversationRow(key, list(first.messages or []), first.active_run_id, first.version)


async def set_statuses(session: DbSession, statuses: list[tuple[str, InboxStatus]], run_id: str | None, now: datetime) -> None:
    """Move inbox messages (id, new status) into `run_id` (None: into no run yet)."""
    if statuses:
        params = [{"b_id": id_, "b_status": status, "b_run_id": run_id, "b_now": now} for id_, status in statuses]
        await _SET_INBOX_STATUS.run_many(session, params)


async def done(session: DbSession, run_id: str) -> None:
    """The run's messages are answered."""
    await _INBOX_DONE.run(session, {"b_run_id": run_id})


async def release_held(session: DbSession, key: str) -> bool:
    """Messages held behind the ended run's approvals queue for a run of their own. True when
    anything of the conversation is queued now."""
    waiting = set((await _WAITING_STATUSES.run(session, {"b_key": key})).scalars())
    if Q.HELD in waiting:
        await _UNHOLD.run(session, {"b_key": key})
    return bool(waiting)
