"""A turn (model call -> classify calls -> run read calls -> propose writes) has no SQL: it is driven
here by the scripted model alone, with no database anywhere."""

from __future__ import annotations

from bot.config import load_settings
from bot.core.events import Thread, User
from bot.core.model import ModelClient
from bot.core.policy import Policy
from bot.core.run_store import RunClaim
from bot.core.turn import Turn
from storage.redact import Redactor
from tests.fakes.openai_server import ScriptedModel, calls
from tests.support_tools import Ledger, notes_toolset
from tools.context import ToolContext
from tools.registry import ToolRegistry

ALICE = User("terminal", "alice", "local", "Alice")


def a_turn(model: ScriptedModel, ledger: Ledger) -> Turn:
    settings = load_settings(env_file=None, environ={"CHATOPS_MODEL": "scripted-model", "OPENAI_BASE_URL": model.url})
    registry = ToolRegistry()
    for spec in notes_toolset(ledger).specs:
        registry.add(spec)
    client = ModelClient(model="scripted-model", api_key=None, base_url=model.url, timeout=5, retries=0, redactor=Redactor())
    return Turn(settings=settings, model=client, registry=registry, policy=Policy(), tool_context=ToolContext())


def a_claim(text: str) -> RunClaim:
    messages = [{"role": "user", "content": text, "name": "alice"}]
    return RunClaim("run-1", 1, "terminal:alice", 0, Thread("terminal", {"session": "alice"}), ALICE, None, messages)


async def _quiet() -> None:
    raise AssertionError("the scripted model answers at once: no slow-model notice")


async def test_a_turn_runs_reads_at_once_and_freezes_writes_into_proposals_without_a_database(model: ScriptedModel) -> None:
    ledger = Ledger()
    model.script(
        calls(("count_notes", {"topic": "ops"}), ("write_note", {"topic": "ops", "text": "restart web-1"}), ("nope", {}))
    )
    turn = a_turn(model, ledger)
    claim = a_claim("count and write")
    reply = await turn.think(claim, _quiet)
    plan = await turn.plan(claim, reply)
    count, write, unknown = (c.id for c in reply.tool_calls)
    assert plan.results[count] == "0"  # the read tool ran
    assert '"unknown_tool"' in plan.results[unknown]
    (proposal,) = plan.proposals
    assert (proposal.call_id, proposal.prepared.spec.name, proposal.rule.rule) == (write, "write_note", "confirm")
    assert proposal.prepared.args == {"topic": "ops", "text": "restart web-1", "priority": 1}
    assert ledger.effects == []  # nothing was written: the write waits for a human
    assert [r.kind for r in plan.rows] == ["tool_proposed", "tool_executed", "tool_proposed", "tool_call_invalid"]
    assert model.requests[0]["messages"][1]["content"] == "count and write"
