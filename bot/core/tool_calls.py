"""One agent step's tool calls: validate each, run what policy lets run at once, freeze the rest
into approvals, and record the step (messages, audit rows, approvals) in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from bot.core import channel_setup, texts
from bot.core.approvals import args_digest, expiry, new_approval_id
from bot.core.cards import card_content
from bot.core.context import AppContext
from bot.core.events import Thread, User
from bot.core.model import ModelReply
from bot.core.outbox import Outbox
from bot.core.policy import CallRule
from storage.audit import Entry, entry
from storage.models import Approval, Conversation, Run
from tools.context import ToolContext
from tools.errors import ToolError
from tools.registry import CallProblem, PreparedCall, result_text

log = logging.getLogger("chatops.tool_calls")


@dataclass(frozen=True)
class StepResult:
    """`tool_messages` to continue with, or None when the step paused on the `created` approvals
    (or, with `owned=False`, when another replica took the run over)."""

    tool_messages: list[dict[str, Any]] | None
    created: list[str]
    owned: bool = True


class ToolCalls:
    def __init__(self, ctx: AppContext, out: Outbox) -> None:
        self.ctx = ctx
        self.out = out

    async def handle(
        self, run_id: str, step: int, reply: ModelReply, requester: User, thread: Thread, model_row: Entry
    ) -> StepResult:
        """Run read calls, freeze write calls, and record the step in one transaction."""
        ctx = self.ctx
        tool_ctx = ctx.tool_context.for_call(approval_id=None, requester=requester)
        results: dict[str, str] = {}
        rows: list[Entry] = [model_row]
        proposals: list[tuple[str, PreparedCall, CallRule]] = []
        for call in reply.tool_calls:
            prepared = ctx.registry.prepare(call.name, call.arguments)
            prepared = channel_setup.refusal(ctx.policy, thread, requester, prepared, ctx.registry) or prepared
            if isinstance(prepared, PreparedCall) and not prepared.spec.read_only:
                prepared = await ctx.registry.check(tool_ctx, prepared) or prepared
            if isinstance(prepared, CallProblem):
                results[call.id] = prepared.as_tool_result()
                rows.append(
                    entry(
                        "tool_call_invalid",
                        run_id=run_id,
                        tool=call.name,
                        status=prepared.kind,
                        message=prepared.message,
                        details=prepared.details,
                    )
                )
                continue
            rule = ctx.policy.rule_for(prepared.spec, prepared.args)
            rows.append(
                entry(
                    "tool_proposed",
                    run_id=run_id,
                    tool=call.name,
                    status=rule.rule,
                    args=prepared.args,
                    args_sha256=args_digest(prepared.args),
                    tool_call_id=call.id,
                )
            )
            if rule.rule == "deny":
                results[call.id] = texts.MODEL_DENIED.format(reason=rule.reason)
            elif rule.rule == "auto":
                results[call.id], status = await self._run_now(tool_ctx, prepared)
                rows.append(
                    entry(
                        "tool_executed", run_id=run_id, tool=call.name, status=status, result=results[call.id][:2000], rule="auto"
                    )
                )
            else:
                proposals.append((call.id, prepared, rule))
        if proposals and (limit := ctx.policy.pending_limit()) is not None:
            async with ctx.db.transaction() as session:
                waiting = (
                    await session.execute(
                        sa.select(sa.func.count())
                        .select_from(Approval)
                        .where(
                            Approval.status == "pending",
                            Approval.requester_id == requester.id,
                            Approval.platform == thread.platform,
                        )
                    )
                ).scalar_one()
            if waiting + len(proposals) > limit:
                for call_id, prepared, _ in proposals:
                    results[call_id] = texts.MODEL_DENIED.format(
                        reason=f"{requester.label} already has {waiting} approvals waiting"
                    )
                    rows.append(
                        entry(
                            "approval_refused",
                            run_id=run_id,
                            tool=prepared.spec.name,
                            actor=requester.key,
                            status="too_many_pending",
                            waiting=waiting,
                            limit=limit,
                        )
                    )
                proposals = []
                ctx.tasks.spawn(self.out.notify(thread, texts.TOO_MANY_PENDING.format(count=waiting)), name="notify-flood")
        previews = [await self._preview(tool_ctx, prepared) for _, prepared, _ in proposals]  # outside the write lock
        created: list[str] = []
        async with ctx.db.transaction() as session:
            run = await session.get(Run, run_id)
            if run is None or run.status != "running" or run.owner != ctx.replica_id:
                return StepResult(None, [], owned=False)
            conv = await session.get(Conversation, run.conversation_key)
            assert conv is not None
            now = ctx.clock()
            run.step, run.updated_at = step, now
            tool_messages = [
                {"role": "tool", "tool_call_id": c.id, "content": results[c.id]} for c in reply.tool_calls if c.id in results
            ]
            conv.messages = [
                *conv.messages,
                *ctx.redactor.redact([reply.assistant_message(), *([] if proposals else tool_messages)]),
            ]
            conv.updated_at = now
            for (call_id, prepared, rule), preview in zip(proposals, previews, strict=True):
                approval = Approval(
                    id=new_approval_id(),
                    run_id=run_id,
                    step=step,
                    tool_call_id=call_id,
                    tool_name=prepared.spec.name,
                    args=prepared.args,
                    args_sha256=args_digest(prepared.args),
                    status="pending",
                    platform=thread.platform,
                    requester_id=requester.id,
                    requester=requester.to_dict(),
                    thread=thread.to_dict(),
                    card=ctx.redactor.redact(
                        card_content(prepared.spec.sentence(prepared.args), prepared.args, list(rule.risks), preview, rule.reason)
                    ),
                    rule=rule.rule,
                    votes=[],
                    expires_at=expiry(now, rule, ctx.settings.approval_ttl),
                    created_at=now,
                )
                session.add(approval)
                created.append(approval.id)
                rows.append(
                    entry(
                        "approval_requested",
                        run_id=run_id,
                        approval_id=approval.id,
                        platform=thread.platform,
                        actor=requester.key,
                        tool=approval.tool_name,
                        status="pending",
                        args_sha256=approval.args_sha256,
                        rule=rule.rule,
                        expires_at=approval.expires_at.isoformat(),
                    )
                )
            if proposals:
                run.status, run.pending_results = "waiting", ctx.redactor.redact(results)
            await ctx.audit.record_many(session, rows)
        return StepResult(None if proposals else tool_messages, created)

    async def _preview(self, tool_ctx: ToolContext, prepared: PreparedCall) -> list[str]:
        """The tool's code-computed preview for the card; a failing preview says so instead of blocking."""
        if prepared.spec.preview is None:
            return []
        try:
            return await asyncio.wait_for(prepared.spec.preview(tool_ctx, prepared.args), self.ctx.settings.tool_timeout)
        except Exception as exc:  # noqa: BLE001 - the card must still be shown
            log.warning("preview of %s failed: %s", prepared.spec.name, type(exc).__name__)
            return [f"(preview unavailable: {type(exc).__name__})"]

    async def _run_now(self, tool_ctx: ToolContext, prepared: PreparedCall) -> tuple[str, str]:
        """Run a call that needs no approval. Returns (result text for the model, status)."""
        timeout = self.ctx.settings.tool_timeout
        try:
            value = await asyncio.wait_for(prepared.spec.run(tool_ctx, prepared.args), timeout)
            return result_text(value), "succeeded"
        except ToolError as exc:
            return texts.MODEL_FAILED_TOOL.format(detail=exc.message), "failed"
        except TimeoutError:
            return texts.MODEL_FAILED_TOOL.format(detail=f"timed out after {timeout:g}s"), "failed"
        except Exception as exc:
            log.exception("read tool %s crashed", prepared.spec.name)
            return texts.MODEL_FAILED_TOOL.format(detail=f"internal error ({type(exc).__name__})"), "failed"

    # ------------------------------------------------------------------ resuming
