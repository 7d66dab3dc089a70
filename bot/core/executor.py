"""Executing an approved call: exactly once, by the replica that wins approved -> executing,
with the frozen arguments, after re-checking authorisation and the arguments' digest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from bot.core.approvals import args_digest, transition
from bot.core.context import AppContext
from bot.core.events import User
from bot.core.policy import CallRule
from storage.models import Approval
from tools.errors import ToolError, ToolInDoubt
from tools.registry import result_text

log = logging.getLogger("chatops.executor")

RuleLookup = Callable[[Approval], CallRule]


class Executor:
    def __init__(self, ctx: AppContext, rule_for: RuleLookup) -> None:
        self.ctx = ctx
        self.rule_for = rule_for

    async def execute(self, approval_id: str) -> bool:
        """Run an approved call. Returns True if this replica ran it (False: someone else did, or refused)."""
        ctx = self.ctx
        async with ctx.db.transaction() as session:
            approval = await session.get(Approval, approval_id)
            if approval is None or approval.status != "approved":
                return False
            common = {
                "run_id": approval.run_id,
                "approval_id": approval.id,
                "platform": approval.platform,
                "tool": approval.tool_name,
            }
            spec = ctx.registry.get(approval.tool_name)
            rule: CallRule = self.rule_for(approval)
            approvers = [User.from_dict(v["user"]) for v in approval.votes or [] if v.get("approve")]
            verdict = ctx.policy.still_authorised(rule, User.from_dict(approval.requester), approvers)
            problem = None
            if spec is None:
                problem = f"the tool {approval.tool_name} is no longer available"
            elif not verdict.allowed:
                problem = verdict.reason
            elif args_digest(approval.args) != approval.args_sha256:
                problem = "the stored arguments no longer match what was approved"
            if problem is not None:
                if await transition(
                    session, approval.id, "approved", status="cancelled", decision_reason=problem, finished_at=ctx.clock()
                ):
                    await ctx.audit.record(session, "execution_blocked", status="cancelled", reason=problem, **common)
                return False
            if not await transition(
                session, approval.id, "approved", status="executing", executor=ctx.replica_id, exec_started_at=ctx.clock()
            ):
                return False
            await ctx.audit.record(
                session, "execution_started", status="executing", actor=ctx.replica_id, args_sha256=approval.args_sha256, **common
            )
        assert spec is not None
        tool_ctx = ctx.tool_context.for_call(approval_id=approval.id, requester=User.from_dict(approval.requester))
        try:
            value = await asyncio.wait_for(spec.run(tool_ctx, approval.args), ctx.settings.tool_timeout)
            status, outcome = "succeeded", result_text(value)
        except ToolInDoubt as exc:
            status, outcome = "in_doubt", exc.message
        except ToolError as exc:
            status, outcome = "failed", exc.message
        except TimeoutError:
            status, outcome = "in_doubt", f"no answer within {ctx.settings.tool_timeout:g}s"
        except Exception as exc:
            log.exception("write tool %s crashed", approval.tool_name)
            status, outcome = "in_doubt", f"the tool crashed ({type(exc).__name__})"
        outcome = ctx.redactor.redact_text(outcome)
        async with ctx.db.transaction() as session:
            await transition(session, approval.id, "executing", status=status, outcome=outcome, finished_at=ctx.clock())
            await ctx.audit.record(session, "tool_executed", status=status, result=outcome[:4000], **common)
        return True
