"""The README's Feishu scope table asks for exactly the scopes of the calls the code makes."""

from __future__ import annotations

import re
from pathlib import Path

from bot.feishu.scopes import CALL_SCOPES, NEEDED_SCOPES

ROOT = Path(__file__).resolve().parent.parent


def test_every_api_call_has_its_scopes_listed():
    source = (ROOT / "bot/feishu/client.py").read_text(encoding="utf-8")
    called = set(re.findall(r'self\._call\(\s*"([a-z ]+)"', source))
    assert called, "the scan found no Feishu API call"
    assert called == set(CALL_SCOPES)


def test_the_readme_table_lists_exactly_the_needed_scopes():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("   | Scope | Why |") :]
    table = table[: table.index("\n\n")]
    listed = {scope for row in table.splitlines()[2:] for scope in re.findall(r"`([a-z0-9_.:]+)`", row.split("|")[1])}
    assert listed == NEEDED_SCOPES
    assert "`im:message` |" not in table  # the broad scope is not asked for
