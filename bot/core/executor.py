"""Running an approved call: exactly once, by the replica that wins approved -> executing, with the
frozen arguments, under a lease renewed while the tool runs.

Just before that, a tool's preview (what the card said would happen, e.g. "will create a new lead")
is computed again; if the effect changed, the call does not run and the model is told. The tool
runs at most once: the database steps around it are retried (the approval service), never the tool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from bot.core import leases, metrics, texts
from bot.core.approvals import ApprovalService
from bot.core.context import AppContext
from bot.core.events import User
from bot.core.logcontext import log_ids
from storage.models import Approval, ApprovalStatus
from tools.errors import ToolError, ToolInDoubt
from tools.registry import result_text

log = logging.getLogger("chatops.executor")
S = ApprovalStatus


class Executor:
    def __init__(self, ctx: AppContext, approvals: ApprovalService) -> None:
        self.ctx = ctx
        self.approvals = approvals

    async def execute(self, approval_id: str) -> bool:
        """Run an approved call. True if this replica ran it (False: someone else did, or it may not run)."""
        ctx = self.ctx
        approval = await ctx.db.run(lambda s: s.get(Approval, approval_id), read=True)
        if approval is None or approval.status != S.APPROVED:
            return False
        problem = await self._preview_changed(approval)
        started = await self.approvals.start_execution(approval_id, problem)
        if started is None:
            return False
        spec = ctx.registry.get(started.tool_name)
        assert spec is not None  # start_execution refuses a vanished tool
        tool_ctx = ctx.tool_context.for_call(approval_id=started.id, requester=User.from_dict(started.requester))
        period = ctx.settings.lease_seconds / 3
        with log_ids(run_id=started.run_id, approval_id=approval_id):
            async with leases.kept(lambda: self.approvals.renew_execution(approval_id), period, approval_id):
                status, outcome = await self._run(spec.run(tool_ctx, started.args), started.tool_name)
        await self.approvals.finish_execution(approval_id, status, outcome)
        return True

    async def _run(self, call: Awaitable[Any], tool: str) -> tuple[S, str]:
        started = time.perf_counter()
        status, outcome = await self._outcome(call, tool)
        metrics.TOOL_SECONDS.labels(tool).observe(time.perf_counter() - started)
        metrics.TOOL_OUTCOMES.labels(tool, str(status)).inc()
        return status, outcome

    async def _outcome(self, call: Awaitable[Any], tool: str) -> tuple[S, str]:
        timeout = self.ctx.settings.tool_timeout
        try:
            value = await asyncio.wait_for(call, timeout)
            return S.SUCCEEDED, result_text(value)
        except ToolInDoubt as exc:
            return S.IN_DOUBT, exc.message
        except ToolError as exc:
            return S.FAILED, exc.message
        except TimeoutError:
            return S.IN_DOUBT, texts.english(texts.OUTCOME_NO_ANSWER).format(seconds=f"{timeout:g}")
        except Exception as exc:
            log.exception("write tool %s crashed", tool)
            return S.IN_DOUBT, texts.english(texts.OUTCOME_CRASHED).format(error=type(exc).__name__)

    async def _preview_changed(self, approval: Approval) -> str | None:
        """A reason not to run when what the card showed is no longer what would happen."""
        shown = (approval.preview_facts or {}).get("lines")
        spec = self.ctx.registry.get(approval.tool_name)
        if shown is None or spec is None or spec.preview is None:
            return None
        tool_ctx = self.ctx.tool_context.for_call(approval_id=None, requester=User.from_dict(approval.requester))
        try:
            now = await asyncio.wait_for(spec.preview(tool_ctx, approval.args), self.ctx.settings.tool_timeout)
        except Exception as exc:  # noqa: BLE001 - cannot re-check: do not run on a stale promise
            return texts.english(texts.PREVIEW_UNCHECKED).format(error=type(exc).__name__)
        if list(now) == list(shown):
            return None
        return texts.english(texts.PREVIEW_CHANGED).format(now=" ".join(now))
