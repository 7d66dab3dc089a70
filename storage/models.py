"""SQLModel tables: every piece of state the bot shares between processes and replicas.

Nothing that must survive a restart or be seen by another replica lives anywhere else.
Schema changes go through an Alembic migration in `storage/migrations/versions/`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def table_of(model: type[SQLModel]) -> sa.Table:
    """A model's table, for Core statements: built once at import and run with bound parameters, they
    skip the ORM's per-call statement building (most of a statement's cost on SQLite); an INSERT of
    many rows is one `executemany` (the ORM's bulk insert splits rows by their set of non-NULL columns)."""
    return SQLModel.metadata.tables[str(model.__tablename__)]


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class InboxStatus(StrEnum):
    """An inbound message: waiting for a run (or held), in one, finished, or refused by policy or a limit."""

    QUEUED = "queued"
    HELD = "held"  # queued behind someone else's pending approval; admitted when the run resumes
    RUNNING = "running"
    DONE = "done"
    REFUSED = "refused"


class RunStatus(StrEnum):
    """A run: working (`running`, under a lease), paused on approvals, or ended."""

    RUNNING = "running"
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (RunStatus.DONE, RunStatus.FAILED, RunStatus.CANCELLED)


class ApprovalStatus(StrEnum):
    """pending -> approved | rejected | expired | cancelled; approved -> executing -> succeeded |
    failed | in_doubt (approved -> cancelled when the call may no longer run)."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    EXECUTING = "executing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"

    @property
    def decided(self) -> bool:
        """True once nothing more will happen to the call (the run may resume)."""
        return self in TERMINAL_APPROVAL_STATUSES


TERMINAL_APPROVAL_STATUSES = frozenset(
    {
        ApprovalStatus.REJECTED,
        ApprovalStatus.EXPIRED,
        ApprovalStatus.CANCELLED,
        ApprovalStatus.SUCCEEDED,
        ApprovalStatus.FAILED,
        ApprovalStatus.IN_DOUBT,
    }
)


class OutboxKind(StrEnum):
    """What an outbox job delivers."""

    REPLY = "reply"
    CARD = "card"
    CARD_UPDATE = "card_update"
    PROGRESS = "progress"  # the run's one progress message: posted once, then edited in place
    ANSWER = "answer"  # a run's final text: replaces the progress message (or streams, when long)
    HOME_REFRESH = "home_refresh"  # re-publish a person's Slack App Home (`thread` names the user)


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    GAVE_UP = "gave_up"


def _ts(*, nullable: bool = False, index: bool = False) -> Any:
    return Field(
        default=None,
        sa_column=sa.Column(UTCDateTime(), nullable=nullable, index=index),
    )


def _json(*, nullable: bool = False) -> Any:
    return Field(default=None, sa_column=sa.Column(sa.JSON(), nullable=nullable))


class SeenKey(SQLModel, table=True):
    """One delivery key (`slack:evt:Ev1`, `slack:msg:C1:1712.3`, `feishu:msg:om_1`) already recorded."""

    __tablename__ = "seen_key"
    key: str = Field(primary_key=True, max_length=300)
    inbox_id: str = Field(index=True, max_length=40)
    created_at: datetime = _ts(index=True)


class InboxEvent(SQLModel, table=True):
    """An inbound user message, recorded before the platform gets its ack; processed exactly once."""

    __tablename__ = "inbox_event"
    id: str = Field(primary_key=True, max_length=40)
    platform: str = Field(max_length=20)
    conversation_key: str = Field(index=True, max_length=300)
    payload: dict[str, Any] = _json()
    status: str = Field(default="queued", index=True, max_length=20)
    run_id: str | None = Field(default=None, max_length=40)
    created_at: datetime = _ts()
    updated_at: datetime = _ts(index=True)  # answered ones are forgotten by it (`CHATOPS_RETENTION_DAYS`)


class Conversation(SQLModel, table=True):
    """The memory of one thread or DM; `active_run_id` is the per-conversation lock."""

    __tablename__ = "conversation"
    key: str = Field(primary_key=True, max_length=300)
    platform: str = Field(max_length=20)
    messages: list[dict[str, Any]] = _json()
    active_run_id: str | None = Field(default=None, max_length=40)
    version: int = 0
    updated_at: datetime = _ts()


class Run(SQLModel, table=True):
    """One agent turn: from a user message to the final answer, possibly paused on approvals."""

    __tablename__ = "run"
    id: str = Field(primary_key=True, max_length=40)
    conversation_key: str = Field(index=True, max_length=300)
    platform: str = Field(max_length=20)
    requester: dict[str, Any] = _json()
    thread: dict[str, Any] = _json()
    status: str = Field(default="running", index=True, max_length=20)
    step: int = 0
    owner: str | None = Field(default=None, max_length=80)
    lease_until: datetime | None = _ts(nullable=True, index=True)
    version: int = 0
    pending_results: dict[str, Any] = _json()
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class Approval(SQLModel, table=True):
    """A frozen write call waiting for (or past) a human decision. Transitions are conditional UPDATEs."""

    __tablename__ = "approval"
    id: str = Field(primary_key=True, max_length=40)
    run_id: str = Field(index=True, max_length=40)
    step: int = 0
    tool_call_id: str = Field(max_length=200)
    tool_name: str = Field(index=True, max_length=200)
    args: dict[str, Any] = _json()
    args_sha256: str = Field(max_length=64)
    status: str = Field(default="pending", index=True, max_length=20)
    version: int = 0
    platform: str = Field(max_length=20)
    requester_id: str = Field(index=True, max_length=200)
    requester: dict[str, Any] = _json()
    thread: dict[str, Any] = _json()
    card: dict[str, Any] = _json()
    card_message_id: str | None = Field(default=None, max_length=200)
    rule: str = Field(default="confirm", max_length=40)
    votes: list[dict[str, Any]] = _json()
    expires_at: datetime = _ts(index=True)
    decided_by: str | None = Field(default=None, max_length=200)
    decided_by_name: str | None = Field(default=None, max_length=200)
    decided_at: datetime | None = _ts(nullable=True)
    decision_reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    executor: str | None = Field(default=None, max_length=80)
    lease_until: datetime | None = _ts(nullable=True)
    preview_facts: dict[str, Any] | None = _json(nullable=True)
    exec_started_at: datetime | None = _ts(nullable=True)
    finished_at: datetime | None = _ts(nullable=True)
    outcome: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    created_at: datetime = _ts()
    # Edit before approve: `revision` counts the versions of the frozen call (1 = as the model
    # proposed it); a card's buttons carry it, so a click on an older card acts on nothing.
    # `edits`: one entry per edit ({"user", "at", "revision", "fields"}), the editors of the call.
    revision: int = Field(default=1, sa_column=sa.Column(sa.Integer(), nullable=False, server_default="1"))
    edits: list[dict[str, Any]] | None = _json(nullable=True)
    reminded_at: datetime | None = _ts(nullable=True)  # the expiry reminder was queued (set once, conditionally)


class CardCopy(SQLModel, table=True):
    """Another message showing an approval's card (a `pending` answer re-posts it with working
    buttons): every later rendering of the card patches it too, so no copy goes on looking pending."""

    __tablename__ = "card_copy"
    id: int | None = Field(default=None, primary_key=True)
    approval_id: str = Field(index=True, max_length=40)
    platform: str = Field(max_length=20)
    message_id: str = Field(max_length=200)
    thread: dict[str, Any] = _json()
    created_at: datetime = _ts(index=True)  # forgotten by it (`CHATOPS_RETENTION_DAYS`)


class AuditEvent(SQLModel, table=True):
    """One step of the audit trail, chained to the previous row by an HMAC-SHA256 (see storage/audit.py)."""

    __tablename__ = "audit_event"
    seq: int = Field(primary_key=True)
    at: datetime = _ts(index=True)
    kind: str = Field(index=True, max_length=40)
    run_id: str | None = Field(default=None, index=True, max_length=40)
    approval_id: str | None = Field(default=None, index=True, max_length=40)
    platform: str | None = Field(default=None, max_length=20)
    actor: str | None = Field(default=None, index=True, max_length=200)
    tool: str | None = Field(default=None, index=True, max_length=200)
    status: str | None = Field(default=None, index=True, max_length=40)
    data: dict[str, Any] = _json()
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)
    key_id: str | None = Field(default=None, max_length=16)  # NULL: legacy unkeyed row (before 0003)


class AuditStaged(SQLModel, table=True):
    """An audit row written atomically with the state change it records, waiting to be chained.

    Writing the hash chain needs one writer at a time; staging keeps that lock out of the hot
    transactions (an ack, a click). The chainer moves staged rows into `audit_event` in order.
    """

    __tablename__ = "audit_staged"
    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _ts()
    kind: str = Field(max_length=40)
    run_id: str | None = Field(default=None, max_length=40)
    approval_id: str | None = Field(default=None, max_length=40)
    platform: str | None = Field(default=None, max_length=20)
    actor: str | None = Field(default=None, max_length=200)
    tool: str | None = Field(default=None, max_length=200)
    status: str | None = Field(default=None, max_length=40)
    data: dict[str, Any] = _json()
    seal: str | None = Field(default=None, max_length=100)  # "key_id:HMAC" of the recorded fields


class OutboxJob(SQLModel, table=True):
    """A card, card update or reply to deliver, written with the state change that calls for it and
    delivered by any replica (retried with the platform's Retry-After until `deadline`)."""

    __tablename__ = "outbox_job"
    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=20)
    platform: str = Field(max_length=20)
    thread_key: str = Field(index=True, max_length=300)
    thread: dict[str, Any] = _json()
    approval_id: str | None = Field(default=None, index=True, max_length=40)
    run_id: str | None = Field(default=None, index=True, max_length=40)  # a run's jobs, sent ones included
    text: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    status: str = Field(default=OutboxStatus.PENDING, index=True, max_length=20)
    attempts: int = 0
    next_attempt_at: datetime = _ts(index=True)
    deadline: datetime = _ts()
    owner: str | None = Field(default=None, max_length=80)
    lease_until: datetime | None = _ts(nullable=True)
    last_error: str | None = Field(default=None, max_length=500)
    message_id: str | None = Field(default=None, max_length=200)
    created_at: datetime = _ts(index=True)  # delivered ones are forgotten by it (`CHATOPS_RETENTION_DAYS`)


class OutboxSent(SQLModel, table=True):
    """A delivered job whose row was locked when it was marked sent (a stopped or vanished server
    process holds it): written instead of waiting, insert-only and without a unique key, so it never
    waits on a lock; a claim and the look for due jobs skip a job that has one, and the sweeper folds
    it into the job's row once that row is free (`bot.core.outbox`)."""

    __tablename__ = "outbox_sent"
    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(index=True)  # no foreign key: its check would lock the job's row
    message_id: str | None = Field(default=None, max_length=200)
    sent_at: datetime = _ts()


class Quota(SQLModel, table=True):
    """Per-user admission counter (fixed one-minute window), updated by one conditional UPDATE so a
    limit holds under bursts and across replicas; its row lock also serialises pending-approval counts."""

    __tablename__ = "quota"
    key: str = Field(primary_key=True, max_length=300)
    window_start: datetime = _ts()
    count: int = 0
    version: int = 0


class Replica(SQLModel, table=True):
    """A running bot process; its heartbeat tells the others whether its work is orphaned."""

    __tablename__ = "replica"
    id: str = Field(primary_key=True, max_length=80)
    host: str = Field(max_length=200)
    pid: int
    started_at: datetime = _ts()
    heartbeat_at: datetime = _ts()


class CrmLead(SQLModel, table=True):
    """A lead in the built-in CRM; one row per (lower-cased) e-mail address."""

    __tablename__ = "crm_lead"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200)
    email: str = Field(sa_column=sa.Column(sa.String(320), nullable=False, unique=True))
    need: str = Field(default="", sa_column=sa.Column(sa.Text(), nullable=False))
    company: str | None = Field(default=None, max_length=200)
    status: str = Field(default="new", max_length=40)
    owner: str | None = Field(default=None, max_length=200)
    source_approval_id: str | None = Field(default=None, max_length=40)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
