"""Slack user-group memberships for the policy's `slack-group:S…` entries.

What belongs here: asking `usergroups.users.list` (scope `usergroups:read`) for the members of
each user group the current policy names, caching each group for `MEMBERS_TTL` seconds, and
answering which of those groups a user is in within `LOOKUP_BUDGET` seconds. Nothing is asked
when the policy names no Slack group. A group that cannot be read (a Slack error, a timeout)
counts as one the user is not in, with a warning in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.core.memberships import LOOKUP_BUDGET, MEMBERS_TTL, MembershipCache
from bot.slack.api_error import error_code

log = logging.getLogger("chatops.slack")

KIND = "slack-group"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SlackApiError):
        return f"Slack answered {error_code(exc, 'an error')}"
    return type(exc).__name__


class SlackGroups:
    """Which of the policy's Slack user groups (`refs()`) a user belongs to."""

    def __init__(
        self,
        client: AsyncWebClient,
        refs: Callable[[], frozenset[str]],
        *,
        budget: float = LOOKUP_BUDGET,
        ttl: float = MEMBERS_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.refs = refs
        self.budget = budget
        self._members = MembershipCache("slack user group", self._fetch, log=log, describe=_describe, ttl=ttl, clock=clock)

    async def _fetch(self, group_id: str) -> frozenset[str]:
        response = await self.client.usergroups_users_list(usergroup=group_id)
        return frozenset(str(user) for user in response.get("users") or [])

    async def groups_of(self, user_id: str) -> tuple[str, ...]:
        """`slack-group:<id>` for every referenced group `user_id` is a member of."""
        refs = sorted(r for r in self.refs() if r.partition(":")[0] == KIND)
        if not refs:
            return ()
        found = await asyncio.gather(*(self._members.get(r.partition(":")[2], self.budget) for r in refs))
        return tuple(ref for ref, members in zip(refs, found, strict=True) if members is not None and user_id in members)

    async def close(self) -> None:
        await self._members.close()
