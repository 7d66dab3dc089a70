"""Per-channel setup from the policy file's `[[channels]]` entries: for a Slack channel, a Feishu
chat, a workspace/tenant, or a glob of them, the system prompt, the model, the allowed tools and
the language.

Entries are tried in order and each setting comes from the first matching entry that sets it
(so put specific channels before `slack:*`). `match` is a glob over `<platform>:<channel id>`
(`slack:C0SALES`, `feishu:oc_*`, `terminal:*`); `tenant` (optional) limits an entry to one Slack
workspace or Feishu tenant. The runner asks `for_run` once per model call; the tool-call step
asks `refusal` for every call, so a tool absent from the request is also refused if called.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from bot.core import i18n, texts
from bot.core.events import Thread, User
from tools.registry import CallProblem, PreparedCall, ToolRegistry, ToolSpec

T = TypeVar("T")


@dataclass(frozen=True)
class ChannelRule:
    """One `[[channels]]` entry of the policy file."""

    match: str
    tenant: str | None = None
    language: str | None = None
    model: str | None = None
    system_prompt: str | None = None
    tools: tuple[str, ...] | None = None  # globs; None: every tool

    def matches(self, platform: str, channel_id: str | None, tenant: str | None) -> bool:
        if self.tenant is not None and self.tenant != tenant:
            return False
        return fnmatch.fnmatchcase(f"{platform}:{channel_id or '-'}", self.match)


@dataclass(frozen=True)
class ChannelSetup:
    """The effective setup of one channel (None: the global default)."""

    language: str | None = None
    model: str | None = None
    system_prompt: str | None = None
    tools: tuple[str, ...] | None = None

    def allows(self, tool_name: str) -> bool:
        return self.tools is None or any(fnmatch.fnmatchcase(tool_name, g) for g in self.tools)

    def specs(self, registry: ToolRegistry) -> list[ToolSpec]:
        return [spec for spec in registry if self.allows(spec.name)]

    def openai_tools(self, registry: ToolRegistry) -> list[dict[str, Any]]:
        """The request's `tools`: only those allowed here (the same cached list when all are)."""
        if self.tools is None:
            return registry.openai_tools()
        return [spec.openai_tool() for spec in self.specs(registry)]


def effective(rules: tuple[ChannelRule, ...], platform: str, channel_id: str | None, tenant: str | None) -> ChannelSetup:
    """Each setting from the first matching rule that sets it."""
    found = [r for r in rules if r.matches(platform, channel_id, tenant)]
    return ChannelSetup(
        language=_first(r.language for r in found),
        model=_first(r.model for r in found),
        system_prompt=_first(r.system_prompt for r in found),
        tools=_first(r.tools for r in found),
    )


def _first(values: Iterable[T | None]) -> T | None:
    return next((v for v in values if v is not None), None)


def channel_of(thread: Thread) -> str | None:
    """The channel / chat id a thread lives in (Slack `channel`, Feishu `chat_id`)."""
    coords = thread.coords
    value = coords.get("channel") or coords.get("chat_id")
    return str(value) if value else None


def parse_channel(spec: str) -> tuple[str, str | None]:
    """`slack:C0SALES` -> ("slack", "C0SALES"); `terminal` -> ("terminal", None)."""
    platform, _, channel = spec.partition(":")
    return platform, channel or None


class SetupSource(Protocol):
    """Where a channel's setup comes from (the policy)."""

    def channel_setup(self, platform: str, channel_id: str | None, tenant: str | None = None) -> ChannelSetup: ...


def for_run(policy: SetupSource, thread: Thread, requester: User) -> ChannelSetup:
    """The setup of a run's channel; also makes the requester's language current (the runner's entry point)."""
    i18n.speak(requester.lang, requester.tz)
    return policy.channel_setup(thread.platform, channel_of(thread), requester.tenant)


def refusal(
    policy: SetupSource, thread: Thread, requester: User, call: PreparedCall | CallProblem, registry: ToolRegistry
) -> CallProblem | None:
    """A `CallProblem` when the model called a tool this channel does not offer, else None."""
    if not isinstance(call, PreparedCall):
        return None
    setup = for_run(policy, thread, requester)
    if setup.allows(call.spec.name):
        return None
    available = ", ".join(s.name for s in setup.specs(registry)) or "-"
    return CallProblem("tool_not_available", texts.TOOL_NOT_HERE.format(tool=call.spec.name, available=available))
