"""The core's own metrics: a run, an approval and a tool execution show up in `/metrics` text,
parsed with prometheus-client's parser."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from bot.core import metrics
from tests.fakes.openai_server import calls, text
from tests.support_tools import Ledger, notes_toolset


def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode("utf-8")):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_runs_approvals_and_tools_are_counted(terminal_bot, model):
    before = samples()
    model.script(calls(("write_note", {"topic": "m", "text": "x"})), text("Stored."))
    bot = await terminal_bot(toolsets=[notes_toolset(Ledger())])
    await bot.say("write a note")
    (approval_id,) = set(re.findall(r"approve (ap-[a-z0-9]+)", bot.transcript()))
    await bot.say(f"approve {approval_id}")
    after = samples()

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("chatops_runs_total", outcome="done") == 1
    assert grew("chatops_approvals_total", state="pending") == 1
    assert grew("chatops_approvals_total", state="approved") == 1
    assert grew("chatops_approvals_total", state="succeeded") == 1
    assert grew("chatops_tool_outcomes_total", tool="write_note", outcome="succeeded") == 1
    assert grew("chatops_tool_seconds_count", tool="write_note") == 1
