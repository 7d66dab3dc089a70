"""Policy: who may use the bot, which rule each tool call falls under, and who may decide.

This module is the one place approval rules are evaluated; tools never check them. `Policy()`
with no file is the default: read tools run at once (`auto`), write tools need the requester's
confirmation (`confirm`), unknown tools are writes. `bot/policy_file.py` builds a `Policy` from
a TOML file. Identities are matched by platform ids (never names):
`slack:U123`, `slack:T1:U123` (tenant-qualified), `feishu:ou_x`, `terminal:alice`,
`slack-group:S123`, `feishu-dept:od_x`, `feishu-group:oc_x` (memberships the adapter resolved).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.core import texts
from bot.core.channel_setup import ChannelRule, ChannelSetup, effective
from bot.core.display import BIDI, code
from bot.core.events import User
from tools.registry import ToolSpec

Rule = Literal["auto", "confirm", "approve", "two_person", "deny"]
RULE_STRENGTH: dict[str, int] = {"auto": 0, "confirm": 1, "approve": 2, "two_person": 3, "deny": 4}
# The group kinds each platform's adapter resolves into `User.groups`.
GROUP_KINDS: dict[str, tuple[str, ...]] = {"slack": ("slack-group",), "feishu": ("feishu-dept", "feishu-group")}


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


@dataclass(frozen=True)
class RecipientRule:
    """Escalate a call whose e-mail recipients fall outside `allowed_domains`."""

    allowed_domains: tuple[str, ...]
    fields: tuple[str, ...] = ("to", "cc")
    rule: Rule = "approve"


@dataclass(frozen=True)
class ToolRule:
    """One `[[tools]]` entry of the policy file."""

    match: str
    rule: Rule
    approvers: tuple[str, ...] = ()
    separate: bool = False
    force: bool = False
    ttl: float | None = None
    recipients: RecipientRule | None = None

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.match)


@dataclass(frozen=True)
class Access:
    tenants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # platform -> allowed tenants
    channels: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    deny_users: tuple[str, ...] = ()


def identity_matches(entry: str, user: User) -> bool:
    """Does one approver/user entry name this user (by id, tenant-qualified id, or group)?"""
    kind, _, rest = entry.partition(":")
    if kind in ("slack-group", "feishu-dept", "feishu-group"):
        return entry in user.groups
    if kind != user.platform:
        return False
    tenant, _, ident = rest.rpartition(":")
    if ident == "*":
        return not tenant or tenant == user.tenant
    return ident == user.id and (not tenant or tenant == user.tenant)


def _recipients(args: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    found: list[str] = []
    for name in fields:
        value = args.get(name)
        if isinstance(value, str):
            found += [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list):
            found += [str(v).strip() for v in value]
    return found


def bidi_in(value: Any) -> set[str]:
    """The text-direction controls (as codes like `U+202E`) anywhere in a JSON-like value, keys included."""
    if isinstance(value, str):
        return {code(c) for c in value if c in BIDI}
    if isinstance(value, dict):
        return set().union(*(bidi_in(k) | bidi_in(v) for k, v in value.items())) if value else set()
    if isinstance(value, list | tuple):
        return set().union(*(bidi_in(v) for v in value)) if value else set()
    return set()


@dataclass
class Policy:
    """Evaluates access, rules and decisions. The default instance is the built-in policy."""

    source: str = "built-in default"
    access: Access = field(default_factory=Access)
    tools: tuple[ToolRule, ...] = ()
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    requests_per_minute: int | None = None
    max_pending_approvals: int | None = None
    deny_bidi_controls: bool = False
    channels: tuple[ChannelRule, ...] = ()

    # ---- access ----------------------------------------------------------------
    def tenant_allowed(self, user: User) -> bool:
        allowed = self.access.tenants.get(user.platform)
        return not allowed or user.tenant in allowed

    def may_use(self, user: User, channel_id: str | None) -> Verdict:
        """May this user talk to the bot here? Bots never may."""
        if user.is_bot:
            return Verdict(False, str(texts.BOTS_CANNOT_USE))
        if not self.tenant_allowed(user):
            return Verdict(False, str(texts.TENANT_NOT_ALLOWED))
        if any(identity_matches(e, user) for e in self._expand(self.access.deny_users)):
            return Verdict(False, str(texts.USER_DENIED))
        if self.access.users and not any(identity_matches(e, user) for e in self._expand(self.access.users)):
            return Verdict(False, str(texts.USER_NOT_LISTED))
        if self.access.channels and channel_id is not None:
            here = f"{user.platform}:{channel_id}"
            if not any(fnmatch.fnmatchcase(here, c) for c in self.access.channels):
                return Verdict(False, str(texts.CHANNEL_NOT_ENABLED))
        return Verdict(True)

    def channel_setup(self, platform: str, channel_id: str | None, tenant: str | None = None) -> ChannelSetup:
        """The per-channel setup (system prompt, model, tools, language) of a channel."""
        return effective(self.channels, platform, channel_id, tenant)

    def request_limit(self) -> int | None:
        """Requests per user per minute (None: unlimited)."""
        return self.requests_per_minute

    def pending_limit(self) -> int | None:
        """Pending approvals per requester (None: unlimited)."""
        return self.max_pending_approvals

    # ---- rules -------------------------------------------------------------------
    def tool_rule(self, spec: ToolSpec) -> ToolRule | None:
        return next((t for t in self.tools if t.matches(spec.name)), None)

    def rule_for(self, spec: ToolSpec, args: dict[str, Any]) -> CallRule:
        """The rule for one call of `spec` with these (validated) arguments."""
        risks: list[str] = [str(texts.RISK_DESTRUCTIVE)] if spec.destructive else []
        if self.deny_bidi_controls and (found := bidi_in(args)):
            return CallRule("deny", "the arguments contain text-direction controls (" + ", ".join(sorted(found)) + ")")
        entry = self.tool_rule(spec)
        if entry is None:
            if spec.read_only:
                return CallRule("auto", str(texts.RULE_READ_ONLY), risks=tuple(risks))
            return CallRule("confirm", str(texts.RULE_WRITE_DEFAULT), risks=tuple(risks))
        rule: Rule = entry.rule
        reason = texts.RULE_FROM_POLICY.format(match=entry.match, rule=rule)
        if rule == "auto" and not spec.read_only and not entry.force:
            rule, reason = "confirm", texts.RULE_AUTO_WRITE.format(match=entry.match)
        if entry.recipients is not None:
            outside = [
                a
                for a in _recipients(args, entry.recipients.fields)
                if a.rpartition("@")[2].lower() not in entry.recipients.allowed_domains
            ]
            if outside:
                risks.append(texts.RISK_EXTERNAL_RECIPIENTS.format(addresses=", ".join(outside[:5])))
                if RULE_STRENGTH[entry.recipients.rule] > RULE_STRENGTH[rule]:
                    rule, reason = (
                        entry.recipients.rule,
                        texts.RULE_RECIPIENTS.format(domains=", ".join(entry.recipients.allowed_domains)),
                    )
        return CallRule(rule, reason, self._expand(entry.approvers), entry.separate, entry.ttl, tuple(risks))

    def group_refs(self, platform: str) -> frozenset[str]:
        """The group entries (`slack-group:S1`, `feishu-dept:od_x`...) of `platform`'s kinds this policy
        names anywhere (users, deny list, approvers; `[groups]` names expanded). The adapter resolves
        memberships only for these, and asks nothing when the set is empty."""
        kinds = GROUP_KINDS.get(platform, ())
        named = (*self.access.users, *self.access.deny_users, *(a for t in self.tools for a in t.approvers))
        return frozenset(e for e in self._expand(named) if e.partition(":")[0] in kinds)

    def _expand(self, names: tuple[str, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for name in names:
            out += self.groups.get(name, (name,))
        return tuple(out)

    # ---- decisions -----------------------------------------------------------------
    def may_decide(
        self, rule: CallRule, requester: User, user: User, votes: list[dict[str, Any]], editors: tuple[User, ...] = ()
    ) -> Verdict:
        """May `user` approve or reject a call under `rule` requested by `requester`? Whoever edited
        the call (`editors`) counts as one of its requesters for separation of duties."""
        if (refused := self._outsider(rule, requester, user)) is not None:
            return refused
        is_requester = user.key == requester.key
        listed = any(identity_matches(e, user) for e in rule.approvers)
        if rule.rule in ("auto", "confirm"):
            if is_requester or listed:
                return Verdict(True)
            only = texts.ONLY_REQUESTER_OR_APPROVER if rule.approvers else texts.ONLY_REQUESTER
            return Verdict(False, only.format(who=requester.label))
        if is_requester and (rule.separate or rule.rule == "two_person"):
            return Verdict(False, str(texts.REQUESTER_CANNOT_APPROVE))
        if any(user.key == e.key for e in editors) and (rule.separate or rule.rule == "two_person"):
            return Verdict(False, str(texts.EDITOR_CANNOT_APPROVE))
        if not rule.approvers:
            return Verdict(False, str(texts.NO_APPROVERS))
        if not listed:
            return Verdict(False, str(texts.NOT_AN_APPROVER))
        return Verdict(True)

    def _outsider(self, rule: CallRule, requester: User, user: User) -> Verdict | None:
        """Who may never act on a call, whatever the rule: a bot, someone of another tenant, someone
        `access.deny_users` names; and nobody on a call the policy denies."""
        if user.is_bot:
            return Verdict(False, str(texts.BOTS_CANNOT_DECIDE))
        if not self.tenant_allowed(user) or (
            requester.tenant and user.platform == requester.platform and user.tenant != requester.tenant
        ):
            return Verdict(False, str(texts.OTHER_TENANT))
        if any(identity_matches(e, user) for e in self._expand(self.access.deny_users)):
            return Verdict(False, str(texts.USER_DENIED))  # denied the bot: denied its decisions too
        if rule.rule == "deny":
            return Verdict(False, str(texts.ACTION_DENIED))
        return None

    def may_edit(self, rule: CallRule, requester: User, user: User) -> Verdict:
        """May `user` edit the frozen arguments of a pending call? Its requester and the approvers
        the rule lists (never a bot, another tenant, or a call the policy denies)."""
        if (refused := self._outsider(rule, requester, user)) is not None:
            return refused
        if user.key == requester.key or any(identity_matches(e, user) for e in rule.approvers):
            return Verdict(True)
        return Verdict(False, texts.ONLY_REQUESTER_OR_APPROVER_EDITS.format(who=requester.label))

    def still_authorised(self, rule: CallRule, requester: User, approvers: list[User], editors: tuple[User, ...] = ()) -> Verdict:
        """Re-checked just before execution: enough approving votes must still be allowed."""
        if rule.rule == "deny":
            return Verdict(False, str(texts.NOW_DENIED))
        valid = {a.key for a in approvers if self.may_decide(rule, requester, a, [], editors).allowed}
        if len(valid) >= rule.votes_needed:
            return Verdict(True)
        revoked = [a.label for a in approvers if a.key not in valid]
        return Verdict(False, texts.APPROVER_REVOKED.format(who=", ".join(revoked) or texts.SOMEONE))

    def describe(self, spec: ToolSpec) -> str:
        """The effective rule of a tool (for arguments that trigger no escalation), for `chatops tools`."""
        entry = self.tool_rule(spec)
        call_rule = self.rule_for(spec, {})
        text = {
            "auto": "auto",
            "confirm": "confirm (requester)",
            "approve": "approve",
            "two_person": "two_person",
            "deny": "deny",
        }[call_rule.rule]
        if call_rule.approvers:
            text += " by " + ", ".join(call_rule.approvers)
        if call_rule.separate:
            text += " (separate)"
        if entry is not None and entry.recipients is not None:
            text += f"; external recipients -> {entry.recipients.rule}"
        if entry is not None and entry.ttl:
            text += f"; ttl {entry.ttl:g}s"
        return text
