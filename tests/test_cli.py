"""The `chatops` command as a user runs it: real processes, a real database file, the scripted model."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from storage.engine import make_sync_engine, normalise_url
from storage.models import CrmLead
from tests.fakes.openai_server import ScriptedModel, calls, text, tool_results

CHATOPS = [sys.executable, "-c", "from bot.cli import main; main()"]


async def chatops(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATOPS_", "OPENAI_", "SLACK_", "FEISHU_"))}
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        *CHATOPS,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout=120)
    return proc.returncode or 0, out.decode(), err.decode()


def bot_env(model: ScriptedModel, tmp_path: Path) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": model.url,
        "OPENAI_API_KEY": "sk-test-cli-key-0000000000",
        "CHATOPS_MODEL": "scripted",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'bot.db'}",
        "USER": "alice",
        "LOGNAME": "alice",
    }


async def test_a_pending_approval_survives_a_restart(model, tmp_path):
    """Process 1 proposes a write and exits; process 2 approves it and finishes the conversation."""
    model.script(
        calls(("create_crm_lead", {"name": "张三", "email": "zhangsan@example.com", "need": "了解产品"})),
        text("线索已创建。"),
    )
    env = bot_env(model, tmp_path)
    code, out, err = await chatops(
        "shell", stdin="客户张三想了解产品，邮箱是 zhangsan@example.com，请创建线索\n", env=env, cwd=tmp_path
    )
    assert code == 0, err
    (approval_id,) = set(re.findall(r"approve (ap-[a-z0-9]+)", out))
    # a Chinese request: a Chinese card, the tool's own summary and preview lines included
    for expected in (
        "需要审批",
        "create_crm_lead",
        "创建 CRM 线索 张三 <zhangsan@example.com>",
        "没有使用该邮箱的线索：将新建一条线索。",
    ):
        assert expected in out, out
    assert "will create a new lead" not in out and "Create the CRM lead" not in out, out
    assert len(model.requests) == 1

    code, out, err = await chatops("shell", stdin=f"approve {approval_id}\n", env=env, cwd=tmp_path)
    assert code == 0, err
    assert "Approved. Running create_crm_lead now." in out and "bot> 线索已创建。" in out
    # the outcome under the Chinese card is Chinese too (it was "Created lead #1 in the built-in CRM.")
    assert f"[{approval_id}] 已完成：已在 内置 CRM 中创建线索 #1。" in out, out
    assert tool_results(model.requests[-1])[0].startswith("{") or "lead" in tool_results(model.requests[-1])[0].lower()
    with sa.orm.Session(make_sync_engine(normalise_url(env["DATABASE_URL"]))) as session:
        leads = session.execute(sa.select(CrmLead)).scalars().all()
    assert [(lead.name, lead.email, lead.source_approval_id) for lead in leads] == [("张三", "zhangsan@example.com", approval_id)]

    code, out, _ = await chatops("audit", "export", "--format", "jsonl", env=env, cwd=tmp_path)
    rows = [json.loads(line) for line in out.splitlines()]
    kinds = [r["kind"] for r in rows]
    for kind in (
        "request_received",
        "run_started",
        "model_call",
        "tool_proposed",
        "approval_requested",
        "card_posted",
        "approval_decided",
        "execution_started",
        "tool_executed",
        "run_resumed",
        "reply_posted",
    ):
        assert kind in kinds, kind
    assert "sk-test-cli-key" not in out
    code, out, _ = await chatops("audit", "verify", env=env, cwd=tmp_path)
    assert code == 0 and out.startswith("OK: ")
    run_id = next(r["run_id"] for r in rows if r["kind"] == "approval_decided")
    code, out, _ = await chatops("audit", "show", run_id, env=env, cwd=tmp_path)
    assert code == 0 and "request_received" in out and "tool_executed" in out
    # The README's example: the execution row names the person it ran for, so --user finds it.
    code, out, _ = await chatops(
        "audit", "list", "--user", "alice", "--tool", "create_crm_lead", "--status", "succeeded", env=env, cwd=tmp_path
    )
    assert code == 0 and "tool_executed" in out and "approval_requested" not in out
    code, out, _ = await chatops("audit", "export", "--format", "csv", env=env, cwd=tmp_path)
    assert out.splitlines()[0].startswith("seq,at,kind,")


async def test_serve_without_a_model_says_which_variables_to_set(tmp_path):
    code, _, err = await chatops("serve", env={"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}, cwd=tmp_path)
    assert code == 2
    assert "CHATOPS_MODEL" in err and "OPENAI_API_KEY" in err and "OPENAI_BASE_URL" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHATOPS_PORT", "abc"),
        ("CHATOPS_MAX_STEPS", "0"),
        ("OPENAI_BASE_URL", "ftp://x"),
        ("SMTP_SECURITY", "tls"),
        ("FEISHU_MODE", "socket"),
        ("DATABASE_URL", "nonsense"),
        ("DATABASE_URL", "mysql://bot:hunter2-secret@db/chatops"),
    ],
)
async def test_a_bad_variable_stops_start_up_with_one_line_naming_it(tmp_path, variable, value):
    code, _, err = await chatops("serve", env={variable: value, "CHATOPS_MODEL": "m"}, cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"chatops: error: {variable} ")
    assert "hunter2-secret" not in err and "plugin" not in err and "driver" not in err


async def test_a_postgres_scheme_url_is_taken_for_postgresql(tmp_path):
    """`postgres://` (libpq's spelling, and many hosts') met SQLAlchemy's "Can't load plugin:
    sqlalchemy.dialects:postgres"."""
    from bot.config import load_settings

    settings = load_settings(env_file=None, environ={"DATABASE_URL": "postgres://bot:pw@db.internal:5432/chatops"})
    assert settings.database_url == "postgresql://bot:pw@db.internal:5432/chatops"
    code, _, err = await chatops("db", "upgrade", env={"DATABASE_URL": "postgres://bot:pw@127.0.0.1:1/chatops"}, cwd=tmp_path)
    assert code == 75 and "plugin" not in err and "127.0.0.1" in err, err  # refused: it may come up, try again


async def test_a_database_that_does_not_answer_exits_75_so_systemd_tries_again(tmp_path):
    """Every start-up failure exited 2, and the unit restarted them all every 5 s: a missing variable
    looped for ever. Now a configuration mistake exits 2 (the unit does not restart it) and a database
    that refused the connection exits 75 (EX_TEMPFAIL), which the unit starts again."""
    env = {"CHATOPS_MODEL": "m", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-x"}
    env["DATABASE_URL"] = "postgresql://postgres@127.0.0.1:1/chatops"
    code, _, err = await chatops("shell", env=env, stdin="", cwd=tmp_path)
    lines = err.strip().splitlines()
    assert code == 75 and len(lines) == 1 and "Connection refused" in lines[0], err
    code, _, _ = await chatops("serve", env={**env, "CHATOPS_PORT": "abc"}, cwd=tmp_path)
    assert code == 2


async def test_a_half_configured_channel_fails_closed(tmp_path):
    code, _, err = await chatops("serve", env={"CHATOPS_MODEL": "m", "SLACK_BOT_TOKEN": "xoxb-1-2-3"}, cwd=tmp_path)
    assert code == 2 and "SLACK_SIGNING_SECRET" in err


async def test_dotenv_is_read_but_the_environment_wins(tmp_path, model):
    (tmp_path / ".env").write_text("CHATOPS_PORT=abc\nCHATOPS_MODEL=from-dotenv\n", encoding="utf-8")
    code, _, err = await chatops("tools", env={"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}, cwd=tmp_path)
    assert code == 2 and "CHATOPS_PORT" in err  # .env was read
    code, _, err = await chatops("tools", env={"CHATOPS_PORT": "3001"}, cwd=tmp_path)
    assert code == 0, err  # the real environment variable won


async def test_a_misspelt_variable_is_named_with_the_setting_it_most_likely_meant(tmp_path, model):
    """A typo (CHATOPS_PROT) was ignored without a word, so the bot ran on the default."""
    (tmp_path / ".env").write_text(
        "CHATOPS_MODEL=m\nSMTP_HOTS=mail.example.com\nPROMETHEUS_MULTIPROC_DIR=/tmp/x\n", encoding="utf-8"
    )
    env = {"CHATOPS_PROT": "3001", "CHATOPS_TAMPER_CASES": "9", "OPENAI_BASE_URL": model.url}
    code, _, err = await chatops("tools", env=env, cwd=tmp_path)
    assert code == 0, err
    warned = [line.split("WARNING chatops: ")[-1] for line in err.splitlines() if "is not a setting" in line]
    assert warned == [
        "CHATOPS_PROT (in the environment) is not a setting and is ignored; did you mean CHATOPS_PORT?",
        "SMTP_HOTS (in .env) is not a setting and is ignored; did you mean SMTP_HOST?",
    ]  # another program's CHATOPS_ name, far from any setting, is left alone; PROMETHEUS_MULTIPROC_DIR is one


async def test_tools_lists_every_tool_with_kind_and_rule(tmp_path):
    code, out, err = await chatops("tools", cwd=tmp_path)
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "read" in lines["search_crm_leads"] and "auto" in lines["search_crm_leads"]
    for name in ("create_crm_lead", "update_crm_lead", "send_email", "notify_feishu", "notify_slack"):
        assert "write" in lines[name] and "confirm" in lines[name]


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["shell"],
        ["tools"],
        ["doctor"],
        ["backup"],
        ["audit"],
        ["audit", "list"],
        ["audit", "show"],
        ["audit", "export"],
        ["audit", "verify"],
        ["audit", "anchor"],
        ["db"],
        ["db", "upgrade"],
        ["policy"],
        ["policy", "check"],
    ],
)
async def test_every_command_has_help(command, tmp_path):
    code, out, _ = await chatops(*command, "--help", cwd=tmp_path)
    assert code == 0 and out.startswith("usage: chatops")


async def test_db_upgrade_and_audit_on_an_unreachable_database_fail_cleanly(tmp_path):
    code, out, _ = await chatops("db", "upgrade", env={"DATABASE_URL": f"sqlite:///{tmp_path / 'y.db'}"}, cwd=tmp_path)
    assert code == 0 and "revision" in out
    env = {"DATABASE_URL": "postgresql://u:hunter2-secret@127.0.0.1:1/none"}
    code, _, err = await chatops("audit", "list", env=env, cwd=tmp_path)
    # 75 (EX_TEMPFAIL): the database refused the connection; trying again later may work
    assert code == 75 and "hunter2-secret" not in err and "Traceback" not in err and "database" in err.lower()


async def test_tools_lists_mcp_tools_and_servers_that_failed(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    proc = await asyncio.create_subprocess_exec("git", "init", "-q", str(repo))
    assert await proc.wait() == 0
    config = tmp_path / "mcp.json"
    config.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "git": {
                        "command": sys.executable,
                        "args": ["-m", "mcp_server_git", "--repository", str(repo)],
                        "trusted": True,
                    },
                    "broken": {"command": str(tmp_path / "no-such-server")},
                }
            }
        )
    )
    code, out, err = await chatops("tools", env={"CHATOPS_MCP_CONFIG": str(config)}, cwd=tmp_path)
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if not line.startswith("!")}
    assert "mcp:git" in lines["git__git_status"] and "read" in lines["git__git_status"] and "auto" in lines["git__git_status"]
    assert "write" in lines["git__git_commit"] and "confirm" in lines["git__git_commit"]
    assert "! MCP server 'broken' failed to start: cannot start" in out


async def test_chatops_approval_show_prints_the_card_in_full(model, tmp_path):
    """The command every shortened card points to (`chatops approval show ID`) once failed with an
    internal error before it looked at its arguments."""
    model.script(calls(("create_crm_lead", {"name": "张三", "email": "zhangsan@example.com", "need": "了解产品 " * 400})))
    env = bot_env(model, tmp_path)
    code, out, _ = await chatops("shell", stdin="create the lead\n", env=env, cwd=tmp_path)
    (approval_id,) = set(re.findall(r"approve (ap-[a-z0-9]+)", out))
    code, out, err = await chatops("approval", "show", approval_id, env=env, cwd=tmp_path)
    assert (code, err) == (0, "") and approval_id in out and out.count("了解产品") == 400  # every word of it
    code, out, err = await chatops("approval", "show", "ap-nope", env=env, cwd=tmp_path)
    assert code != 0 and "no approval 'ap-nope'" in err and "Traceback" not in err


async def test_a_database_upgraded_by_a_newer_version_is_named_in_one_line(tmp_path):
    """Rolling back the code (or an old replica restarting after a new one migrated) met alembic's
    `CommandError`: `chatops db upgrade` said "internal error", doctor advised `chatops db upgrade`."""
    url = f"sqlite:///{tmp_path / 'bot.db'}"
    code, _, _ = await chatops("db", "upgrade", env={"DATABASE_URL": url}, cwd=tmp_path)
    assert code == 0
    engine = make_sync_engine(normalise_url(url))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    for command in (["db", "upgrade"], ["shell"]):
        code, _, err = await chatops(
            *command, env={"DATABASE_URL": url, "CHATOPS_MODEL": "m", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, cwd=tmp_path
        )
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "revision 9999, newer than this chatops knows" in err and "internal error" not in err
    code, out, _ = await chatops(
        "doctor", env={"DATABASE_URL": url, "CHATOPS_MODEL": "m", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}, cwd=tmp_path
    )
    assert code == 1 and "newer than this chatops knows" in out and "chatops db upgrade" not in out
