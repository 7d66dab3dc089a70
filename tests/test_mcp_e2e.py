"""MCP through the whole bot: mcp-server-git configured with CHATOPS_MCP_CONFIG, a scripted model,
the terminal adapter. Reads run at once; a commit waits for its card; approve commits, reject does not."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import TerminalBot, TerminalFactory
from tests.fakes.openai_server import calls, text, tool_results
from tests.git_helpers import git
from tests.test_core_agent import approval_ids


@pytest.fixture
def mcp_config(tmp_path: Path, repo: Path) -> Path:
    path = tmp_path / "mcp.json"
    server = {"command": sys.executable, "args": ["-m", "mcp_server_git", "--repository", str(repo)], "trusted": True}
    path.write_text(json.dumps({"mcpServers": {"git": server}}))
    return path


async def git_bot(terminal_bot: TerminalFactory, mcp_config: Path) -> TerminalBot:
    bot = await terminal_bot(CHATOPS_MCP_CONFIG=str(mcp_config))
    spec = bot.app.ctx.registry.get("git__git_commit")
    assert spec is not None and spec.source == "mcp:git" and not spec.read_only
    return bot


async def test_git_status_runs_without_a_card(terminal_bot, model, mcp_config, repo):
    model.script(calls(("git__git_status", {"repo_path": str(repo)})), text("One file is staged: notes.txt."))
    bot = await git_bot(terminal_bot, mcp_config)
    await bot.say("what is the git status")
    assert approval_ids(bot.transcript()) == []
    (status,) = tool_results(model.requests[-1])
    assert "Changes to be committed" in status and "notes.txt" in status
    assert "bot> One file is staged: notes.txt." in bot.transcript()


async def test_commit_waits_for_approval_then_commits(terminal_bot, model, mcp_config, repo):
    model.script(calls(("git__git_commit", {"repo_path": str(repo), "message": "Add line two"})), text("Committed."))
    bot = await git_bot(terminal_bot, mcp_config)
    await bot.say("commit the staged changes with message Add line two")
    (approval_id,) = approval_ids(bot.transcript())
    assert "Run git_commit on the MCP server git" in bot.transcript()
    assert git(repo, "log", "-1", "--format=%s").strip() == "initial"  # nothing before the decision

    await bot.say(f"approve {approval_id}")
    assert git(repo, "log", "-1", "--format=%s").strip() == "Add line two"
    assert git(repo, "rev-list", "--count", "HEAD").strip() == "2"
    assert "committed" in tool_results(model.requests[-1])[0].lower()
    assert "bot> Committed." in bot.transcript()


async def test_rejected_commit_does_nothing(terminal_bot, model, mcp_config, repo):
    model.script(calls(("git__git_commit", {"repo_path": str(repo), "message": "Add line two"})), text("Not committed."))
    bot = await git_bot(terminal_bot, mcp_config)
    await bot.say("commit the staged changes with message Add line two")
    (approval_id,) = approval_ids(bot.transcript())
    await bot.say(f"reject {approval_id} not yet")
    assert git(repo, "rev-list", "--count", "HEAD").strip() == "1"
    assert "not yet" in tool_results(model.requests[-1])[0]
    assert "bot> Not committed." in bot.transcript()
