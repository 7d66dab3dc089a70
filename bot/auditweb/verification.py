"""The chain verification badge: the result of the last verification this page ran.

Verification walks the whole chain, so it runs when someone asks for it ("Verify now"), not on
every page view. The check itself is `bot.cli_audit.chain_problem`, the one function the CLI's
`chatops audit verify` uses too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from bot.auditweb.reader import head
from bot.cli_audit import chain_problem
from storage.audit_keys import AuditKeys
from storage.models import utcnow


@dataclass(frozen=True)
class Verification:
    """One verification: the chain head it covered and the first bad row, if any."""

    at: datetime
    head: int
    broken_seq: int | None
    reason: str | None

    @property
    def intact(self) -> bool:
        return self.broken_seq is None


def verify(session: Session, keys: AuditKeys | None) -> Verification:
    """Verify the chain as it is in this read snapshot, under the audit key ring."""
    covered = head(session)
    problem = chain_problem(session, keys)
    if problem is None:
        return Verification(utcnow(), covered, None, None)
    return Verification(utcnow(), covered, problem.seq, problem.reason)


@dataclass(frozen=True)
class Badge:
    """What the badge says: `state` is intact, broken or unverified."""

    state: str
    label: str
    detail: str


def badge(last: Verification | None, current_head: int) -> Badge:
    if last is None:
        return Badge("unverified", "not verified", "The chain has not been verified since this page started.")
    when = last.at.strftime("%Y-%m-%d %H:%M:%S UTC")
    if not last.intact:
        return Badge("broken", f"broken at seq {last.broken_seq}", f"{last.reason} (verified {when}).")
    newer = current_head - last.head
    detail = f"Rows 1–{last.head} verified {when}." if last.head else f"The log was empty when verified ({when})."
    if newer > 0:
        detail += f" {newer} newer row{'s' if newer != 1 else ''} not verified yet."
    return Badge("intact", "intact", detail)
