"""The README's examples are real: its policy files and MCP configuration parse, and every variable
it documents is one the bot reads (and is in .env.example)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bot.config import Settings
from bot.core.policy_file import parse_policy
from tools.mcp.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_policy_examples_parse():
    examples = blocks("toml")
    assert len(examples) >= 2
    for example in examples:
        parse_policy(example, "README example")


def test_mcp_example_parses(monkeypatch):
    monkeypatch.setenv("DOCS_TOKEN", "a-token")
    (example,) = blocks("json")
    config = parse_config(json.loads(example), source="README example")
    assert set(config.servers) == {"git", "docs"}


def test_every_setting_is_documented_in_readme_and_env_example():
    env_example = (ROOT / ".env.example").read_text(encoding="utf-8")
    for field in Settings.model_fields.values():
        assert field.alias in README, field.alias
        assert re.search(rf"^{field.alias}=", env_example, flags=re.M), field.alias


def test_env_example_loads_as_is():
    from bot.config import load_settings

    settings = load_settings(env_file=ROOT / ".env.example", environ={})
    assert settings.model == "gpt-4o-mini" and not settings.model_configured  # the key is still to be filled in
    assert not settings.slack_enabled and not settings.feishu_enabled


def section(title: str) -> str:
    match = re.search(rf"^## {title}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"no section {title!r}"
    return match.group(1)


def test_deploy_section_names_the_files_that_exist():
    deploy = section("Deploy")
    for heading in ("### Docker", "### Compose: PostgreSQL and two replicas", "### systemd"):
        assert heading in deploy
    for path in re.findall(r"\]\(((?:deploy/)?[\w./-]+)\)", deploy):
        assert (ROOT / path).is_file(), path


def test_operate_section_matches_the_endpoints_metrics_and_commands():
    from bot.cli import build_parser
    from bot.core import metrics

    operate = section("Operate")
    for heading in (
        "### Health and readiness",
        "### Metrics",
        "### Logs",
        "### Checking a configuration",
        "### Backup and restore",
        "### Upgrading",
    ):
        assert heading in operate
    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "_labelnames")}
    documented = set(re.findall(r"`(chatops_[a-z_]+?)(?:_total)?`", operate))
    assert documented == exported
    parser = build_parser()
    for command in ("doctor", "backup x.db", "db upgrade", "audit verify"):
        parser.parse_args(command.split())
    for endpoint in ("/healthz", "/readyz", "/metrics"):
        assert f"`GET {endpoint}`" in operate


def test_the_doctor_example_names_the_current_schema_revision():
    """The example said "code expects 0002" while the code expected 0009."""
    from storage.migrate import head_revision

    (expected,) = re.findall(r"code expects (\w+)", README)
    assert expected == head_revision()
