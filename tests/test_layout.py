"""The package import rules written in each package's `__init__.py`, checked over the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLATFORM_SDKS = ("slack_sdk", "slack_bolt", "lark_oapi")
ADAPTERS = ("bot.slack", "bot.feishu", "bot.terminal")
APP_LAYER = ("bot.app", "bot.cli", "bot.cli_audit", "bot.cli_workers", "bot.lifecycle", "bot.auditweb", "bot.logsetup")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports (absolute names), with its line number."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        if "migrations" in path.parts:
            continue
        for line, name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


def test_core_imports_no_adapter_app_layer_or_platform_sdk() -> None:
    assert violations("bot.core", (*ADAPTERS, *APP_LAYER, *PLATFORM_SDKS)) == []


def test_tools_import_nothing_of_the_bot() -> None:
    assert violations("tools", ("bot",)) == []


def test_storage_imports_neither_bot_nor_tools() -> None:
    assert violations("storage", ("bot", "tools", *PLATFORM_SDKS)) == []


@pytest.mark.parametrize(
    ("adapter", "others"), [("bot.slack", ("bot.feishu", "lark_oapi")), ("bot.feishu", ("bot.slack", "slack_sdk", "slack_bolt"))]
)
def test_adapters_do_not_import_each_other(adapter: str, others: tuple[str, ...]) -> None:
    assert violations(adapter, (*others, *APP_LAYER)) == []


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from bot.slack import SlackAdapter\nimport lark_oapi.api.im.v1\n", encoding="utf-8")
    assert [name for _, name in imports_of(sample)] == ["bot.slack", "bot.slack.SlackAdapter", "lark_oapi.api.im.v1"]
