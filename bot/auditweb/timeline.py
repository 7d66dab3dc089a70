"""A run's timeline: its audit rows in order, each placed in a phase of the run.

request → model calls → cards → decisions → executions → reply. A kind this module does not know
(added later by the engine) is shown in its place with the phase "other", never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from storage.models import AuditEvent

PHASES: dict[str, tuple[str, ...]] = {
    "request": ("request_received", "request_refused", "run_started", "run_resumed", "run_taken_over", "cancelled"),
    "model": ("model_call", "model_error"),
    "card": ("tool_proposed", "tool_call_invalid", "approval_requested", "card_posted"),
    "decision": (
        "approval_vote",
        "approval_decided",
        "approval_refused",
        "approval_cancelled",
        "approval_expired",
        "click_refused",
    ),
    "execution": ("execution_started", "tool_executed", "execution_blocked", "execution_in_doubt"),
    "reply": ("reply_posted",),
}
PHASE_OF_KIND = {kind: phase for phase, kinds in PHASES.items() for kind in kinds}


@dataclass(frozen=True)
class Step:
    """One row of the timeline, with its phase and its offset from the first row."""

    row: AuditEvent
    phase: str
    offset_seconds: float


@dataclass(frozen=True)
class Timeline:
    """A run's steps and a short summary of it."""

    run_id: str
    steps: list[Step]
    started: datetime
    requester: str | None
    phases_seen: list[str]

    @property
    def duration_seconds(self) -> float:
        return self.steps[-1].offset_seconds if self.steps else 0.0

    @property
    def last_status(self) -> str | None:
        return self.steps[-1].row.status if self.steps else None


def build_timeline(run_id: str, rows: list[AuditEvent]) -> Timeline:
    """Rows ordered by seq (non-empty) -> the run's timeline."""
    started = rows[0].at
    steps = [Step(row, PHASE_OF_KIND.get(row.kind, "other"), (row.at - started).total_seconds()) for row in rows]
    requester = next((row.actor for row in rows if row.kind == "request_received" and row.actor), None)
    requester = requester or next((row.actor for row in rows if row.actor), None)
    seen = [phase for phase in [*PHASES, "other"] if any(step.phase == phase for step in steps)]
    return Timeline(run_id, steps, started, requester, seen)
