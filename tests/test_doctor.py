"""`chatops doctor` against the fakes: every check passing, then every check failing with a fix."""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from bot.doctor import FAIL, OK, SKIP, run_checks
from storage.migrate import upgrade
from tests.conftest import make_settings
from tests.fakes.feishu_api import FakeFeishu
from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.openai_server import failure
from tests.fakes.slack_api import FakeSlackApi
from tests.fakes.smtp_server import FakeSmtp
from tests.test_cli import chatops

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def services():
    async with FakeSlackApi() as slack, FakeSmtp() as smtp, FakeHubSpot() as hubspot:
        feishu = await FakeFeishu().start()
        try:
            yield slack, feishu, smtp, hubspot
        finally:
            await feishu.stop()


def mcp_config(tmp_path: Path, *, broken: bool) -> Path:
    repo = tmp_path / "repo"
    servers = {"git": {"command": sys.executable, "args": ["-m", "mcp_server_git", "--repository", str(repo)], "trusted": True}}
    if broken:
        servers = {"broken": {"command": str(tmp_path / "no-such-server")}}
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": servers}), encoding="utf-8")
    return path


def env_for(tmp_path: Path, slack, feishu, smtp, hubspot, *, broken: bool) -> dict[str, str]:
    policy = tmp_path / "policy.toml"
    shutil.copy(ROOT / "policy.example.toml", policy)
    if broken:
        policy.write_text("[[tools]]\nmatch = 'x'\nrule = 'sometimes'\n", encoding="utf-8")
    return {
        "SLACK_BOT_TOKEN": "xoxb-doctor" if not broken else "bad-token",
        "SLACK_APP_TOKEN": "xapp-doctor" if not broken else "bad-app-token",
        "SLACK_API_URL": slack.url,
        "FEISHU_APP_ID": f"cli_{uuid.uuid4().hex[:12]}",  # lark-oapi caches tenant tokens per app id, process-wide
        "FEISHU_APP_SECRET": "feishu-doctor-secret",
        "FEISHU_DOMAIN": feishu.url,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp.port),
        "SMTP_SECURITY": "none" if not broken else "starttls",
        "SMTP_FROM": "bot@example.com",
        "CHATOPS_CRM": "hubspot",
        "HUBSPOT_TOKEN": hubspot.token if not broken else "pat-wrong",
        "HUBSPOT_BASE_URL": hubspot.url,
        "CHATOPS_POLICY": str(policy),
        "CHATOPS_MCP_CONFIG": str(mcp_config(tmp_path, broken=broken)),
    }


async def test_every_check_passes_against_healthy_services(tmp_path, model, services, sqlite_url, repo):
    upgrade(sqlite_url)
    settings = make_settings(model.url, sqlite_url, **env_for(tmp_path, *services, broken=False))
    findings = {f.check: f for f in await run_checks(settings)}
    assert {name for name, f in findings.items() if f.status != OK} == set(), findings
    for check in ("model", "database", "policy", "slack auth.test", "slack scopes", "slack socket mode", "feishu token",
                  "feishu bot info", "feishu event mode", "smtp", "hubspot", "mcp git"):  # fmt: skip
        assert check in findings
    assert "tools" in model.requests[-1]  # the model was asked with a tool offered
    assert services[2].attempts == []  # no mail was sent


async def test_every_check_fails_with_a_fix_against_broken_services(tmp_path, model, services, sqlite_url):
    feishu = services[1]
    feishu.app_secret = "the-right-secret"  # ours is refused
    model.script(failure(401))
    settings = make_settings(model.url, sqlite_url, **env_for(tmp_path, *services, broken=True))  # never migrated
    findings = {f.check: f for f in await run_checks(settings)}
    expected = {
        "model": "OPENAI_API_KEY",
        "database": "chatops db upgrade",
        "policy": "policy check",
        "slack auth.test": "SLACK_BOT_TOKEN",
        "slack socket mode": "SLACK_APP_TOKEN",
        "feishu token": "FEISHU_APP_SECRET",
        "smtp": "SMTP_SECURITY",
        "hubspot": "HUBSPOT_TOKEN",
        "mcp broken": "command",
    }
    for check, fix in expected.items():
        assert findings[check].status == FAIL and fix in findings[check].fix, findings[check]


async def test_missing_slack_scopes_are_named(tmp_path, model, services, sqlite_url):
    slack = services[0]
    slack.scopes = ["chat:write", "app_mentions:read"]
    settings = make_settings(
        model.url, sqlite_url, SLACK_BOT_TOKEN="xoxb-doctor", SLACK_APP_TOKEN="xapp-doctor", SLACK_API_URL=slack.url
    )
    findings = {f.check: f for f in await run_checks(settings)}
    scopes = findings["slack scopes"]
    assert scopes.status == FAIL and "reactions:write" in scopes.detail and "im:history" in scopes.detail
    assert "manifest.yml" in scopes.fix
    assert findings["feishu"].status == SKIP and findings["smtp"].status == SKIP


async def test_doctor_command_prints_a_table_and_exits_non_zero_when_broken(tmp_path, model):
    env = {"OPENAI_BASE_URL": model.url, "OPENAI_API_KEY": "sk-doctor-key", "CHATOPS_MODEL": "scripted"}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'fresh.db'}"  # not migrated yet
    code, out, err = await chatops("doctor", env=env, cwd=tmp_path)
    assert code == 1, err
    lines = out.splitlines()
    assert lines[0].split() == ["check", "status", "detail"]
    assert any(line.split()[:2] == ["model", "ok"] for line in lines)
    assert any(line.split()[:2] == ["database", "FAIL"] for line in lines) and "fix: run `chatops db upgrade`" in out
    assert "Traceback" not in err and "sk-doctor-key" not in out + err
    assert not (tmp_path / "fresh.db").exists()  # the check created an empty database file
    code, out, _ = await chatops("db", "upgrade", env=env, cwd=tmp_path)
    code, out, err = await chatops("doctor", env=env, cwd=tmp_path)
    assert code == 0, out + err


async def test_tools_marks_tools_whose_service_is_not_configured(tmp_path):
    code, out, err = await chatops("tools", env={"SMTP_HOST": "127.0.0.1", "SMTP_FROM": "bot@example.com"}, cwd=tmp_path)
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "not configured: set SLACK_BOT_TOKEN" in lines["notify_slack"]
    assert "not configured: set FEISHU_WEBHOOK_URL" in lines["notify_feishu"]
    assert lines["send_email"].rstrip().endswith("ok")
