"""The CRM backend a tool call uses: the built-in one (our database) or HubSpot (CHATOPS_CRM)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from tools.crm.backend import NO_DATABASE, NO_HUBSPOT_TOKEN, CrmBackend
from tools.crm.builtin import BuiltinCrm
from tools.crm.hubspot import HubSpotCrm
from tools.errors import ToolUnavailable

if TYPE_CHECKING:
    from tools.context import ToolContext


def open_backend(ctx: ToolContext) -> AbstractAsyncContextManager[CrmBackend]:
    """The configured backend, open for the duration of one tool call."""
    if ctx.crm.backend == "hubspot":
        return _hubspot(ctx)
    return _builtin(ctx)


@asynccontextmanager
async def _builtin(ctx: ToolContext) -> AsyncIterator[CrmBackend]:
    if ctx.db is None:
        raise ToolUnavailable(NO_DATABASE())
    yield BuiltinCrm(ctx.db)


@asynccontextmanager
async def _hubspot(ctx: ToolContext) -> AsyncIterator[CrmBackend]:
    if ctx.crm.hubspot is None:
        raise ToolUnavailable(NO_HUBSPOT_TOKEN())
    async with HubSpotCrm.connect(ctx.crm.hubspot) as crm:
        yield crm
