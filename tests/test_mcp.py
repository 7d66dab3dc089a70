"""MCP servers as tools: the real mcp-server-git over stdio, our own misbehaving server over stdio
and streamable HTTP, and the configuration file.

What mcp-server-git (2026.10.19) really sends, read from its tools/list answer: git_status,
git_diff_unstaged, git_diff_staged, git_diff, git_log, git_show and git_branch carry
`readOnlyHint: true, destructiveHint: false`; git_commit, git_add, git_create_branch and
git_checkout carry `readOnlyHint: false, destructiveHint: false`; git_reset carries
`readOnlyHint: false, destructiveHint: true`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from storage.engine import Database
from tests.git_helpers import git
from tools.context import ToolContext
from tools.errors import ToolConfigError, ToolError, ToolInDoubt, ToolUnavailable
from tools.mcp import McpManager, parse_config
from tools.mcp.connection import Connection
from tools.mcp.specs import OPENAI_NAME, openai_name
from tools.registry import RESULT_LIMIT, CallProblem, PreparedCall, ToolRegistry, ToolSpec, result_text

FLAKY = str(Path(__file__).parent / "fakes" / "mcp_servers" / "flaky.py")
WAIT = 30.0


@pytest.fixture
async def ctx(sqlite_url: str) -> AsyncIterator[ToolContext]:
    db = Database(sqlite_url)
    yield ToolContext(db=db)
    await db.dispose()


@asynccontextmanager
async def running(servers: dict[str, Any], **options: Any) -> AsyncIterator[tuple[McpManager, dict[str, ToolSpec]]]:
    manager = McpManager(parse_config({"mcpServers": servers}), **{"backoff_initial": 0.05, "backoff_max": 0.2, **options})
    try:
        specs = await manager.start()
        yield manager, {spec.name: spec for spec in specs}
    finally:
        await manager.close()


async def until(connection: Connection, predicate: Callable[[Connection], bool]) -> None:
    async with asyncio.timeout(WAIT):
        await connection.wait_for(predicate)


def git_server(repo: Path, **extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": ["-m", "mcp_server_git", "--repository", str(repo)], **extra}


def flaky_server(state: Path) -> dict[str, Any]:
    return {"command": sys.executable, "args": [FLAKY], "env": {"FLAKY_STATE": str(state)}, "trusted": True}


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ---- configuration and naming ---------------------------------------------------------------------


def test_config_errors_name_the_server_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ToolConfigError, match=r"server 'git': key 'denny': Extra inputs are not permitted"):
        parse_config({"mcpServers": {"git": {"command": "x", "denny": ["git_reset"]}}})
    with pytest.raises(ToolConfigError, match=r"server 'both': give either `command`"):
        parse_config({"mcpServers": {"both": {"command": "x", "url": "http://h/mcp"}}})
    with pytest.raises(ToolConfigError, match=r"server 'git': key 'tools.git_log.read_only': Input should be a valid boolean"):
        parse_config({"mcpServers": {"git": {"command": "x", "tools": {"git_log": {"read_only": "maybe"}}}}})
    with pytest.raises(ToolConfigError, match=r"server 'docs': key 'headers' uses \$\{DOCS_TOKEN\}, which is not set"):
        parse_config({"mcpServers": {"docs": {"url": "https://h/mcp", "headers": {"Authorization": "Bearer ${DOCS_TOKEN}"}}}})
    monkeypatch.setenv("DOCS_TOKEN", "t0ken")
    config = parse_config(
        {"mcpServers": {"docs": {"url": "https://h/mcp", "headers": {"Authorization": "Bearer ${DOCS_TOKEN}"}}}}
    )
    assert config.servers["docs"].headers == {"Authorization": "Bearer t0ken"}

    path = tmp_path / "mcp.json"
    path.write_text('{"mcpServers": {"git": {"command": "x",}}}')
    with pytest.raises(ToolConfigError, match=r"CHATOPS_MCP_CONFIG \(.*mcp.json\) is not valid JSON: .* line 1"):
        McpManager.from_file(path)
    with pytest.raises(ToolConfigError, match="CHATOPS_MCP_CONFIG cannot be read"):
        McpManager.from_file(tmp_path / "missing.json")


def test_openai_names_are_valid_and_deterministic() -> None:
    assert openai_name("git", "git_status") == "git__git_status"
    odd = openai_name("my server.prod", "search/files")
    long = openai_name("server", "t" * 100)
    for name in (odd, long):
        assert OPENAI_NAME.match(name) and len(name) <= 64
    assert odd == openai_name("my server.prod", "search/files")
    assert odd != openai_name("my_server_prod", "search_files")  # the hash keeps sanitised names apart


def test_a_look_alike_tool_name_is_spelled_out_in_the_cards_summary() -> None:
    """ "Run gіt_push on the MCP server ops" read as git_push: the і is Cyrillic."""
    import mcp_types

    from tools.mcp.config import ServerConfig
    from tools.mcp.specs import build_spec

    async def never(*_: Any) -> str:
        raise AssertionError("not called")

    schema = {"type": "object", "properties": {"branch": {"type": "string"}}}
    for name, said in (
        ("git_push", "Run git_push on the MCP server ops"),
        ("g\u0456t_push", "Run g\\u0456t_push on the MCP server ops"),
    ):
        tool = mcp_types.Tool(name=name, inputSchema=schema)
        spec = build_spec("ops", ServerConfig(command="x"), tool, never)
        assert spec.sentence({"branch": "main"}) == said


# ---- the real mcp-server-git ------------------------------------------------------------------------


async def test_git_server_classification(repo: Path) -> None:
    servers = {
        "git": git_server(repo, trusted=True, deny=["git_checkout"], tools={"git_log": {"read_only": False}}),
        "untrusted": git_server(repo, allow=["git_status", "git_commit"]),
    }
    async with running(servers) as (manager, specs):
        assert manager.problems == {}
        assert specs["git__git_status"].read_only and not specs["git__git_status"].destructive
        assert specs["git__git_status"].source == "mcp:git"
        commit = specs["git__git_commit"]
        assert not commit.read_only and not commit.destructive
        assert specs["git__git_reset"].destructive  # destructiveHint: true
        assert "git__git_checkout" not in specs  # denied
        assert not specs["git__git_log"].read_only  # the operator's override wins over the hint
        # The same hints from a server that is not trusted are not believed.
        assert {n for n in specs if n.startswith("untrusted__")} == {"untrusted__git_status", "untrusted__git_commit"}
        assert not specs["untrusted__git_status"].read_only and specs["untrusted__git_status"].destructive
        assert commit.openai_tool()["function"]["parameters"]["required"] == ["repo_path", "message"]
        assert commit.sentence({"repo_path": str(repo), "message": "m"}) == "Run git_commit on the MCP server git"


async def test_git_status_and_commit_through_the_manager(repo: Path, ctx: ToolContext) -> None:
    async with running({"git": git_server(repo, trusted=True)}) as (_, specs):
        registry = ToolRegistry(specs.values())
        status = registry.prepare("git__git_status", json.dumps({"repo_path": str(repo)}))
        assert isinstance(status, PreparedCall)
        assert "Changes to be committed" in await status.spec.run(ctx, status.args)

        bad = registry.prepare("git__git_commit", json.dumps({"repo_path": str(repo)}))
        assert isinstance(bad, CallProblem) and bad.kind == "invalid_arguments"
        assert "'message' is a required property" in bad.details[0]["problem"]

        commit = registry.prepare("git__git_commit", json.dumps({"repo_path": str(repo), "message": "Add world"}))
        assert isinstance(commit, PreparedCall)
        answer = await commit.spec.run(ctx, commit.args)
        assert "committed" in answer.lower()
        assert git(repo, "log", "-1", "--format=%s").strip() == "Add world"
        assert git(repo, "status", "--porcelain") == ""

        with pytest.raises(ToolError, match="outside the allowed repository"):
            await specs["git__git_status"].run(ctx, {"repo_path": "/"})


async def test_server_that_cannot_start_is_reported(repo: Path, tmp_path: Path) -> None:
    servers = {
        "git": git_server(repo, trusted=True),
        "missing": {"command": str(tmp_path / "no-such-command")},
        "norepo": git_server(tmp_path / "not-there"),
    }
    async with running(servers, connect_timeout=20) as (manager, specs):
        assert "git__git_status" in specs and not any(n.startswith(("missing", "norepo")) for n in specs)
        assert manager.problems["missing"] == f"cannot start '{tmp_path / 'no-such-command'}': command not found"
        assert manager.problems["norepo"].startswith("the server closed the connection (stderr: ")
        assert "does not exist" in manager.problems["norepo"]


# ---- our own misbehaving server (stdio) ----------------------------------------------------------------


async def test_results_errors_and_size_cap(tmp_path: Path, ctx: ToolContext) -> None:
    async with running({"flaky": flaky_server(tmp_path)}) as (_, specs):
        assert await specs["flaky__echo"].run(ctx, {"text": "你好"}) == "你好"
        with pytest.raises(ToolError, match="disk full") as caught:
            await specs["flaky__fail"].run(ctx, {"reason": "disk full"})
        assert type(caught.value) is ToolError
        big = await specs["flaky__big"].run(ctx, {"size": 100_000})
        assert len(big) < RESULT_LIMIT and big.endswith("more characters]")
        assert result_text(big) == big  # the runner's own cap leaves it alone


async def test_timeout(tmp_path: Path, sqlite_url: str) -> None:
    db = Database(sqlite_url)
    quick = ToolContext(db=db)
    async with running({"flaky": flaky_server(tmp_path)}, call_timeout=1) as (_, specs):
        with pytest.raises(ToolUnavailable, match="did not answer within 1s"):
            await specs["flaky__hang"].run(quick, {})
        assert await specs["flaky__echo"].run(quick, {"text": "still up"}) == "still up"
    await db.dispose()


async def test_crash_reconnects_and_calls_while_down_are_unavailable(tmp_path: Path, ctx: ToolContext) -> None:
    async with running({"flaky": flaky_server(tmp_path)}) as (manager, specs):
        connection = manager.connection("flaky")
        (tmp_path / "refuse_start").touch()  # the next starts fail until the file is gone
        with pytest.raises(ToolUnavailable, match="disconnected during the call"):
            await specs["flaky__die"].run(ctx, {})
        await until(connection, lambda c: c.state == "down")
        with pytest.raises(ToolUnavailable, match="The MCP server flaky is down"):
            await specs["flaky__echo"].run(ctx, {"text": "anyone?"})
        failed_starts = len(lines(tmp_path / "starts.log"))
        assert failed_starts == 1  # refused starts never log

        (tmp_path / "refuse_start").unlink()
        await until(connection, lambda c: c.state == "up" and c.connects == 2)
        assert len(lines(tmp_path / "starts.log")) == 2
        assert await specs["flaky__echo"].run(ctx, {"text": "back"}) == "back"


async def test_crash_during_a_write_is_in_doubt_and_never_resent(tmp_path: Path, ctx: ToolContext) -> None:
    async with running({"flaky": flaky_server(tmp_path)}) as (manager, specs):
        assert not specs["flaky__crash_during"].read_only and specs["flaky__crash_during"].destructive
        with pytest.raises(ToolInDoubt, match="may or may not have run"):
            await specs["flaky__crash_during"].run(ctx, {"text": "once"})
        await until(manager.connection("flaky"), lambda c: c.state == "up" and c.connects == 2)
        assert await specs["flaky__record"].run(ctx, {"text": "after"}) == "recorded after"
        assert lines(tmp_path / "calls.log") == ["crash_during once", "record after"]


# ---- streamable HTTP ---------------------------------------------------------------------------------------


async def start_http(state: Path, port: int = 0) -> tuple[asyncio.subprocess.Process, int]:
    """The flaky server over streamable HTTP in a child process, and the port it listens on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        FLAKY,
        "--http",
        str(port),
        env={"FLAKY_STATE": str(state)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    return proc, int(await proc.stdout.readline())


async def stop_http(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


async def test_streamable_http_server(tmp_path: Path, ctx: ToolContext) -> None:
    proc, port = await start_http(tmp_path)
    try:
        servers = {"remote": {"url": f"http://127.0.0.1:{port}/mcp", "headers": {"X-Team": "ops"}, "trusted": True}}
        async with running(servers) as (manager, specs):
            assert specs["remote__echo"].read_only and specs["remote__echo"].source == "mcp:remote"
            assert not specs["remote__record"].read_only
            assert await specs["remote__echo"].run(ctx, {"text": "over http"}) == "over http"
            assert await specs["remote__record"].run(ctx, {"text": "x"}) == "recorded x"
            assert lines(tmp_path / "calls.log") == ["record x"]

            # The server goes away: reads say so, the connection goes down, then comes back with the server.
            await stop_http(proc)
            with pytest.raises(ToolUnavailable):
                await specs["remote__echo"].run(ctx, {"text": "hello?"})
            connection = manager.connection("remote")
            await until(connection, lambda c: c.state == "down")
            proc, _ = await start_http(tmp_path, port)
            await until(connection, lambda c: c.state == "up" and c.connects == 2)
            assert await specs["remote__echo"].run(ctx, {"text": "again"}) == "again"
    finally:
        await stop_http(proc)


async def test_http_write_to_a_server_that_is_gone_is_not_sent(tmp_path: Path, ctx: ToolContext) -> None:
    proc, port = await start_http(tmp_path)
    try:
        servers = {"remote": {"url": f"http://127.0.0.1:{port}/mcp", "trusted": True}}
        async with running(servers) as (_, specs):
            assert await specs["remote__record"].run(ctx, {"text": "x"}) == "recorded x"
            await stop_http(proc)
            with pytest.raises(ToolUnavailable, match="not sent: the MCP server remote cannot be reached; record did not run"):
                await specs["remote__record"].run(ctx, {"text": "y"})  # a write, yet not in doubt: it never left
            assert lines(tmp_path / "calls.log") == ["record x"]
    finally:
        await stop_http(proc)
