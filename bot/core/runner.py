"""The run lifecycle: start a run for a conversation's queued messages, drive it turn by turn under
a lease, pause on approvals, resume once they are decided, finish with the answer, and end a run
that hit an unexpected error with one sentence to the user (the conversation stays usable).

There is no recursion: `process_conversation` loops over runs, `drive` loops over claims (a resumed
run is a new claim), `_advance` loops over steps.
"""

from __future__ import annotations

import logging
import uuid

from bot.core import leases, run_slots, texts
from bot.core.context import AppContext
from bot.core.errors import ModelReplyUnusable, ModelUnavailable
from bot.core.logcontext import log_ids
from bot.core.outbox import Outbox
from bot.core.progress_lines import HeldLines
from bot.core.run_store import RunClaim, RunStore
from bot.core.turn import Turn, model_row
from storage.audit import entry
from storage.models import RunStatus

log = logging.getLogger("chatops.runner")
R = RunStatus


class Runner:
    """Drives runs. Every method is safe to call from any replica at any time."""

    def __init__(self, ctx: AppContext, store: RunStore, out: Outbox) -> None:
        self.ctx = ctx
        self.store = store
        self.out = out
        self.turn = Turn.of(ctx)
        self.held_lines = HeldLines(ctx, store.queue_progress)

    async def process_conversation(self, key: str) -> None:
        """Start runs for this conversation's queued messages, one run at a time, each in one of
        this process's run slots (`run_slots`)."""
        while True:
            more = False
            self.store.unread.add(key)
            try:
                async with self.ctx.run_slots.run() as timing:
                    started = await self.store.start_run(key)
                    if started.claim is not None:
                        timing.ran = True
                        await self.out.show_working(started.claim.thread)
                        more = await self.drive(started.claim)
            finally:
                self.store.unread.discard(key)
            if started.resume_run_id is not None:
                await self.resume(started.resume_run_id)
                return
            if not more:
                return

    async def resume(self, run_id: str) -> None:
        """Resume a waiting run if every approval of its step is decided (any replica may win)."""
        claim = await self.store.resume(run_id)
        if claim is not None and await self.drive(claim):
            await self.process_conversation(claim.conversation_key)

    async def drive(self, claim: RunClaim | None) -> bool:
        """Work on a run until it pauses, ends or is lost. True when it ended with messages queued."""
        more = False
        while claim is not None:
            with log_ids(run_id=claim.run_id, conversation_id=claim.conversation_key):
                claim, more = await self._drive_claim(claim)
        return more

    async def _drive_claim(self, claim: RunClaim) -> tuple[RunClaim | None, bool]:
        """One claim under its lease: (the resumed claim to go on with, or None; more queued)."""
        period = self.ctx.settings.lease_seconds / 3
        async with leases.kept(lambda: self.store.renew(claim), period, claim.run_id):
            try:
                await self._open(claim)
                return await self._advance(claim)
            except Exception as exc:  # noqa: BLE001 - any error ends the run, never the conversation
                return None, await self._fail(claim, exc)
            finally:
                claim.ended = True
                self.held_lines.drop(claim.run_id)

    async def _advance(self, claim: RunClaim) -> tuple[RunClaim | None, bool]:
        """Steps until an answer (-> (None, more queued)), a pause ((resumed claim | None, False))."""
        ctx = self.ctx
        step = claim.step
        while True:
            if claim.lost:
                return None, False  # taken over (see the lease renewal); the new owner goes on from what is stored
            if step >= ctx.settings.max_steps:
                return None, await self.store.finish(claim, texts.MAX_STEPS.format(steps=step), R.FAILED, [])
            try:
                with run_slots.outside():
                    reply = await self.turn.think(claim, lambda: self._slow_notice(claim))
            except ModelUnavailable as exc:
                log.warning(
                    "run %s failed: the model did not answer after its retries (%s); the user was told", claim.run_id, exc
                )
                row = entry("model_error", run_id=claim.run_id, status="error", error=str(exc))
                said = texts.MODEL_BAD_RESPONSE if isinstance(exc, ModelReplyUnusable) else texts.MODEL_FAILED
                return None, await self.store.finish(claim, said, R.FAILED, [row])
            step += 1
            first = model_row(claim.run_id, reply)
            if not reply.tool_calls:
                return None, await self.store.finish(claim, reply.content or "", R.DONE, [first])
            with run_slots.outside():
                plan = await self.turn.plan(claim, reply, lambda line: self._progress(claim, line))
            assistant = reply.assistant_message()
            if plan.only_read and claim.young(ctx.clock()):
                self.store.defer_step(claim, step, assistant, plan.results, [first, *plan.rows])
                continue
            record = await self.store.record_step(claim, step, assistant, plan.results, plan.proposals, [first, *plan.rows])
            if not record.owned:
                return None, False  # another replica took the run over
            if record.paused:
                # Decisions may already have landed (or expired) while the cards were queued.
                return await self.store.resume(claim.run_id), False
            claim.messages = [*claim.messages, assistant, *record.tool_messages]
            claim.step = step

    async def _open(self, claim: RunClaim) -> None:
        """A resumed run's first working line ("Decided; working on the result…"), held like the others:
        a run that answers soon after the decision just posts its answer."""
        if claim.opening_line is None:
            return
        try:
            await self._progress(claim, claim.opening_line)
        except Exception as exc:  # noqa: BLE001 - a working line is a courtesy: the run goes on
            log.warning("could not queue a progress line: %s", type(exc).__name__)

    async def _slow_notice(self, claim: RunClaim) -> None:
        """The model is slow: the run's progress message says so (no extra message)."""
        await self._progress(claim, str(texts.MODEL_SLOW))

    async def _progress(self, claim: RunClaim, line: str) -> None:
        """A working line for the run's one progress message: held while the run is young (see
        `progress_lines`), queued at once after that."""
        if not self.held_lines.offer(claim, line):
            await self.store.queue_progress(claim, line)

    async def _fail(self, claim: RunClaim, exc: Exception) -> bool:
        """End the run with one sentence to the user and an audit row; free the conversation."""
        ref = uuid.uuid4().hex[:8]
        log.error("run %s failed (ref %s): %s", claim.run_id, ref, type(exc).__name__, exc_info=exc)
        row = entry("run_failed", run_id=claim.run_id, status="failed", error=type(exc).__name__, ref=ref)
        try:
            return await self.store.finish(claim, texts.INTERNAL_ERROR.format(ref=ref), R.FAILED, [row])
        except Exception as again:  # noqa: BLE001 - the lease runs out and another replica takes the run over
            log.error("could not record the failure of run %s (ref %s): %s", claim.run_id, ref, type(again).__name__)
            return False
