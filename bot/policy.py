"""Policy: who may use the bot, which rule each tool call falls under, and who may decide.

This module is the one place approval is enforced; tools never check it themselves.
`Policy()` with no file is the default: read tools run at once (`auto`), write tools need
the requester's confirmation (`confirm`), unknown tools are writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from bot.events import User
from tools.registry import ToolSpec

Rule = Literal["auto", "confirm", "approve", "two_person", "deny"]


@dataclass(frozen=True)
class CallRule:
    """The rule that applies to one concrete call, and why (shown on the card)."""

    rule: Rule
    reason: str
    approvers: tuple[str, ...] = ()
    separate: bool = False
    ttl: float | None = None
    risks: tuple[str, ...] = ()

    @property
    def votes_needed(self) -> int:
        return 2 if self.rule == "two_person" else 1


@dataclass(frozen=True)
class Verdict:
    """Whether a user may do something; `reason` explains a refusal in plain words."""

    allowed: bool
    reason: str = ""


@dataclass
class Policy:
    """The default policy. A policy file (issue #6) produces a richer subclass of the same interface."""

    source: str = "built-in default"
    limits: dict[str, Any] = field(default_factory=dict)

    def may_use(self, user: User, channel_id: str | None) -> Verdict:
        """May this user talk to the bot here? Bots never may."""
        if user.is_bot:
            return Verdict(False, "bots cannot use chatops")
        return Verdict(True)

    def rule_for(self, spec: ToolSpec, args: dict[str, Any]) -> CallRule:
        """The rule for one call of `spec` with these (validated) arguments."""
        risks = ("destructive tool",) if spec.destructive else ()
        if spec.read_only:
            return CallRule("auto", "read-only tool", risks=risks)
        return CallRule("confirm", "write tool: the requester confirms", risks=risks)

    def may_decide(self, rule: CallRule, requester: User, user: User, votes: list[dict[str, Any]]) -> Verdict:
        """May `user` approve or reject a call under `rule` requested by `requester`?"""
        if user.is_bot:
            return Verdict(False, "bots cannot decide approvals")
        if rule.rule == "deny":
            return Verdict(False, "this action is denied by policy")
        if rule.rule == "confirm":
            if user.key == requester.key:
                return Verdict(True)
            return Verdict(False, f"only {requester.label}, who asked, can decide this")
        return Verdict(False, "no approvers are configured for this action")

    def still_authorised(self, rule: CallRule, requester: User, approvers: list[User]) -> Verdict:
        """Re-checked just before execution: every approving vote must still be allowed."""
        for approver in approvers:
            verdict = self.may_decide(rule, requester, approver, [])
            if not verdict.allowed:
                return Verdict(False, f"{approver.label} may no longer approve: {verdict.reason}")
        return Verdict(True)

    def describe(self, spec: ToolSpec) -> str:
        """The effective rule of a tool, for `chatops tools`."""
        return "auto" if spec.read_only else "confirm (requester)"
