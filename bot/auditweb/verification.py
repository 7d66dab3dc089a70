"""The chain verification badge: the result of the last verification this page ran.

Verification walks the whole chain, so it runs when someone asks for it ("Verify now"), not on
every page view. The check itself is `bot.cli_audit.chain_problem`, the one function the CLI's
`chatops audit verify` uses too.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from bot.auditweb.reader import head, prefix_state
from bot.cli_audit import chain_problem
from storage.audit import compute_hash, keyed_hash
from storage.audit_keys import AuditKeys
from storage.models import AuditEvent, utcnow


@dataclass(frozen=True)
class Verification:
    """One verification: the chain head it covered and the first bad row, if any."""

    at: datetime
    head: int
    broken_seq: int | None
    reason: str | None
    head_hash: str | None = None  # the hash row `head` had: rows deleted or rewritten since show as a change

    @property
    def intact(self) -> bool:
        return self.broken_seq is None


def verify(session: Session, keys: AuditKeys | None) -> Verification:
    """Verify the chain as it is in this read snapshot, under the audit key ring."""
    covered = head(session)
    head_hash = prefix_state(session, covered)[1]
    problem = chain_problem(session, keys)
    if problem is None:
        return Verification(utcnow(), covered, None, None, head_hash)
    return Verification(utcnow(), covered, problem.seq, problem.reason, head_hash)


def changed_since(session: Session, last: Verification | None) -> str | None:
    """Why the rows an intact verification covered are no longer what it saw (rows deleted, the
    head rewritten), or None. Cheap: a count and one row, on every page view."""
    if last is None or not last.intact or not last.head:
        return None
    count, digest = prefix_state(session, last.head)
    if count != last.head:
        return f"{last.head - count} of rows 1–{last.head} have been deleted since"
    if digest != last.head_hash:
        return f"row {last.head} has been rewritten since"
    return None


def altered(rows: Iterable[AuditEvent], keys: AuditKeys | None) -> set[int]:
    """The rows shown whose content no longer matches their own hash (edited in the database)."""
    bad = set()
    for row in rows:
        if row.key_id is None:
            expected = compute_hash(row)
        elif keys is not None and (key := keys.by_id(row.key_id)) is not None:
            expected = keyed_hash(key, row)
        else:
            continue  # a key the page does not hold: "Verify now" names it
        if not hmac.compare_digest(expected, row.hash):
            bad.add(row.seq)
    return bad


@dataclass(frozen=True)
class Badge:
    """What the badge says: `state` is intact, broken or unverified."""

    state: str
    label: str
    detail: str


def badge(last: Verification | None, current_head: int, changed: str | None = None, edited: Iterable[int] = ()) -> Badge:
    """The last verification's word, unless what is shown contradicts it: a row on this page that
    no longer matches its hash, or rows it covered deleted or rewritten since."""
    when = last.at.strftime("%Y-%m-%d %H:%M:%S UTC") if last else ""
    if last is not None and not last.intact:
        return Badge("broken", f"broken at seq {last.broken_seq}", f"{last.reason} (verified {when}).")
    if shown := sorted(edited):
        rows = ", ".join(str(seq) for seq in shown[:5]) + (" …" if len(shown) > 5 else "")
        return Badge("broken", "altered", f"Row {rows} shown here no longer matches its hash (edited in the database).")
    if last is None:
        return Badge("unverified", "not verified", "The chain has not been verified since this page started.")
    if changed:
        return Badge("broken", "changed since verified", f"Verified intact {when}, but {changed}: verify again.")
    newer = current_head - last.head
    detail = f"Rows 1–{last.head} verified {when}." if last.head else f"The log was empty when verified ({when})."
    if newer > 0:
        detail += f" {newer} newer row{'s' if newer != 1 else ''} not verified yet."
    return Badge("intact", "intact", detail)
