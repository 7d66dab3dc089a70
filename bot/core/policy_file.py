"""Loading the policy file (`CHATOPS_POLICY`, TOML) into a `Policy`, with errors that name the
line and the reason, and reloading it when it changes (so a revoked approver is refused at
execution time without a restart). See `policy.example.toml` for an annotated example.
"""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bot.core.channel_setup import ChannelRule, ChannelSetup
from bot.core.errors import PolicyError
from bot.core.events import User
from bot.core.policy import Access, CallRule, Policy, RecipientRule, ToolRule, Verdict
from tools.registry import ToolSpec

log = logging.getLogger("chatops.policy")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_IDENTITY = re.compile(r"^(slack|feishu|terminal):([^:\s]+:)?[^:\s]+$|^(slack-group|feishu-dept|feishu-group):[^:\s]+$")
RuleName = Literal["auto", "confirm", "approve", "two_person", "deny"]


def parse_duration(value: str | float) -> float:
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError("must be positive")
        return float(value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError("use seconds or a duration like 30m, 4h, 1d")
    return float(match[1]) * _SECONDS[match[2]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Recipients(_Strict):
    allowed_domains: list[str] = Field(min_length=1)
    fields: list[str] = ["to", "cc"]
    rule: Literal["approve", "two_person", "deny"] = "approve"


class _Tool(_Strict):
    match: str = Field(min_length=1)
    rule: RuleName
    approvers: list[str] = []
    separate: bool = False
    force: bool = False
    ttl: float | None = None
    external_recipients: _Recipients | None = None

    @field_validator("ttl", mode="before")
    @classmethod
    def _ttl(cls, value: Any) -> float | None:
        return None if value is None else parse_duration(value)


class _Access(_Strict):
    slack_teams: list[str] = []
    feishu_tenants: list[str] = []
    channels: list[str] = []
    users: list[str] = []
    deny_users: list[str] = []


class _Limits(_Strict):
    requests_per_minute: int | None = Field(default=None, ge=1)
    max_pending_approvals: int | None = Field(default=None, ge=1)


class _Arguments(_Strict):
    deny_bidi_controls: bool = False


class _Channel(_Strict):
    match: str = Field(min_length=1, pattern=r"^[a-z]+:\S+$")
    tenant: str | None = None
    language: Literal["en", "zh"] | None = None
    model: str | None = Field(None, min_length=1)
    system_prompt: str | None = Field(None, min_length=1)
    tools: list[str] | None = None


class _PolicyFile(_Strict):
    access: _Access = _Access()
    limits: _Limits = _Limits()
    arguments: _Arguments = _Arguments()
    groups: dict[str, list[str]] = {}
    tools: list[_Tool] = []
    channels: list[_Channel] = []


def _line_of(text: str, loc: tuple[Any, ...], value: Any) -> int | None:
    """Best effort: the line where the offending key (or value) is written."""
    key = next((str(p) for p in reversed(loc) if isinstance(p, str)), None)
    needle = str(value) if isinstance(value, str | int | float) else None
    for number, line in enumerate(text.splitlines(), 1):
        if key and re.match(rf"\s*{re.escape(key)}\s*=", line) and (needle is None or needle in line):
            return number
    for number, line in enumerate(text.splitlines(), 1):
        if needle and needle in line:
            return number
    return None


def _check_identities(data: _PolicyFile) -> None:
    for where, entries in [
        ("access.users", data.access.users),
        ("access.deny_users", data.access.deny_users),
        *[(f"groups.{k}", v) for k, v in data.groups.items()],
        *[(f"tools[{i}].approvers", t.approvers) for i, t in enumerate(data.tools)],
    ]:
        for entry in entries:
            if entry in data.groups and not where.startswith("groups."):
                continue
            if not _IDENTITY.match(entry):
                raise ValueError(
                    f"{where}: {entry!r} is neither a group name nor an identity like slack:U123, "
                    "slack:T1:U123, feishu:ou_x, slack-group:S123, feishu-dept:od_x"
                )
    for i, tool in enumerate(data.tools):
        if tool.rule in ("approve", "two_person") and not tool.approvers:
            raise ValueError(f"tools[{i}] ({tool.match}): rule {tool.rule!r} needs an `approvers` list")


def parse_policy(text: str, source: str) -> Policy:
    """Validate policy TOML. Raises PolicyError naming the line and the reason."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: {exc}") from None
    try:
        data = _PolicyFile.model_validate(raw)
        _check_identities(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        path = ".".join(str(p) for p in err["loc"])
        line = _line_of(text, tuple(err["loc"]), err.get("input"))
        where = f"{source}:{line}" if line else source
        raise PolicyError(f"{where}: {path}: {err['msg']}") from None
    except ValueError as exc:
        raise PolicyError(f"{source}: {exc}") from None
    tenants = {k: tuple(v) for k, v in (("slack", data.access.slack_teams), ("feishu", data.access.feishu_tenants)) if v}
    return Policy(
        source=source,
        access=Access(
            tenants=tenants,
            channels=tuple(data.access.channels),
            users=tuple(data.access.users),
            deny_users=tuple(data.access.deny_users),
        ),
        tools=tuple(
            ToolRule(
                t.match,
                t.rule,
                tuple(t.approvers),
                t.separate,
                t.force,
                t.ttl,
                RecipientRule(
                    tuple(d.lower().lstrip("@") for d in t.external_recipients.allowed_domains),
                    tuple(t.external_recipients.fields),
                    t.external_recipients.rule,
                )
                if t.external_recipients
                else None,
            )
            for t in data.tools
        ),
        groups={k: tuple(v) for k, v in data.groups.items()},
        requests_per_minute=data.limits.requests_per_minute,
        max_pending_approvals=data.limits.max_pending_approvals,
        deny_bidi_controls=data.arguments.deny_bidi_controls,
        channels=tuple(
            ChannelRule(c.match, c.tenant, c.language, c.model, c.system_prompt, None if c.tools is None else tuple(c.tools))
            for c in data.channels
        ),
    )


def load_policy_file(path: Path, *, named_by: str | None = "CHATOPS_POLICY") -> Policy:
    """The policy in `path`; `named_by`: where the path came from, for the error line (None: the command line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        prefix = f"{named_by}: " if named_by else ""
        raise PolicyError(f"{prefix}cannot read {path}: {exc.strerror}") from None
    return parse_policy(text, str(path))


class ReloadingPolicy(Policy):
    """A policy file re-read whenever it changes; a broken edit keeps the last good policy (and logs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._current = load_policy_file(path)
        self._stamp = self._mtime()
        super().__init__(source=self._current.source)

    def _mtime(self) -> tuple[int, int]:
        stat = self.path.stat()
        return stat.st_mtime_ns, stat.st_size

    def current(self) -> Policy:
        try:
            stamp = self._mtime()
        except OSError:
            return self._current
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._current = load_policy_file(self.path)
                log.info("policy reloaded from %s", self.path)
            except PolicyError as exc:
                log.error("policy file changed but is invalid; keeping the previous policy: %s", exc)
        return self._current

    def may_use(self, user: User, channel_id: str | None) -> Verdict:
        return self.current().may_use(user, channel_id)

    def rule_for(self, spec: ToolSpec, args: dict[str, Any]) -> CallRule:
        return self.current().rule_for(spec, args)

    def may_decide(
        self, rule: CallRule, requester: User, user: User, votes: list[dict[str, Any]], editors: tuple[User, ...] = ()
    ) -> Verdict:
        return self.current().may_decide(rule, requester, user, votes, editors)

    def may_edit(self, rule: CallRule, requester: User, user: User) -> Verdict:
        return self.current().may_edit(rule, requester, user)

    def still_authorised(self, rule: CallRule, requester: User, approvers: list[User], editors: tuple[User, ...] = ()) -> Verdict:
        return self.current().still_authorised(rule, requester, approvers, editors)

    def describe(self, spec: ToolSpec) -> str:
        return self.current().describe(spec)

    def group_refs(self, platform: str) -> frozenset[str]:
        return self.current().group_refs(platform)

    def channel_setup(self, platform: str, channel_id: str | None, tenant: str | None = None) -> ChannelSetup:
        return self.current().channel_setup(platform, channel_id, tenant)

    def request_limit(self) -> int | None:
        return self.current().request_limit()

    def pending_limit(self) -> int | None:
        return self.current().pending_limit()
