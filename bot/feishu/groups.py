"""Feishu memberships for the policy's `feishu-dept:od-…` and `feishu-group:oc_…` entries.

What belongs here: which of the departments and group chats the current policy names a user is
in. Departments come from the user's own record (`contact/v3/users/:open_id`, field
`department_ids`: direct departments only, not their parents), group chats from the chat's
member list (`im/v1/chats/:chat_id/members`, every page). Each answer is cached for
`MEMBERS_TTL` seconds (per user, per chat) and waited for at most `LOOKUP_BUDGET` seconds.
Nothing is asked when the policy names no department or chat. Whatever cannot be read counts
as "not a member", with a warning in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from bot.core.memberships import LOOKUP_BUDGET, MEMBERS_TTL, MembershipCache
from bot.feishu.client import FeishuApi, FeishuApiError

log = logging.getLogger("chatops.feishu")

DEPT = "feishu-dept"
CHAT = "feishu-group"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FeishuApiError):
        return f"Feishu answered code {exc.code}" if exc.code is not None else str(exc)
    return type(exc).__name__


class FeishuGroups:
    """Which of the policy's Feishu departments and group chats (`refs()`) a user belongs to."""

    def __init__(
        self,
        api: FeishuApi,
        refs: Callable[[], frozenset[str]],
        *,
        budget: float = LOOKUP_BUDGET,
        ttl: float = MEMBERS_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.refs = refs
        self.budget = budget
        self._departments = MembershipCache(
            "feishu departments of user", api.user_departments, log=log, describe=_describe, ttl=ttl, clock=clock
        )
        self._chats = MembershipCache("feishu group chat", api.chat_members, log=log, describe=_describe, ttl=ttl, clock=clock)

    async def groups_of(self, open_id: str) -> tuple[str, ...]:
        """`feishu-dept:<id>` / `feishu-group:<chat_id>` for every referenced one `open_id` is in."""
        refs = self.refs()
        depts = sorted(r for r in refs if r.partition(":")[0] == DEPT)
        chats = sorted(r for r in refs if r.partition(":")[0] == CHAT)
        if not depts and not chats:
            return ()
        in_depts, in_chats = await asyncio.gather(self._in_departments(open_id, depts), self._in_chats(open_id, chats))
        return (*in_depts, *in_chats)

    async def _in_departments(self, open_id: str, depts: list[str]) -> list[str]:
        if not depts:
            return []
        mine = await self._departments.get(open_id, self.budget)
        return [ref for ref in depts if mine is not None and ref.partition(":")[2] in mine]

    async def _in_chats(self, open_id: str, chats: list[str]) -> list[str]:
        found = await asyncio.gather(*(self._chats.get(ref.partition(":")[2], self.budget) for ref in chats))
        return [ref for ref, members in zip(chats, found, strict=True) if members is not None and open_id in members]

    async def close(self) -> None:
        await self._departments.close()
        await self._chats.close()
