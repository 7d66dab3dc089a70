"""The type checker over `bot/`, `tools/` and `storage/` (configured in pyproject.toml, strict), and the
rule for what it may not check: every `# type: ignore[code]` names its code and says why."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("bot", "tools", "storage")
IGNORE = re.compile(r"#\s*type:\s*ignore(?P<codes>\[[^\]]*\])?(?P<rest>.*)$")


def test_mypy_is_clean() -> None:
    # The cache lives in the checkout (.mypy_cache, git-ignored): a rerun checks only what changed.
    result = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_checks_every_package_strictly() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    assert sorted(config["files"]) == sorted(CHECKED)
    assert config["strict"] is True


def unexplained_ignores(source: str) -> list[tuple[int, str]]:
    """(line, text) of each `# type: ignore` without an error code or without a `# reason` after it."""
    found = []
    for number, line in enumerate(source.splitlines(), 1):
        match = IGNORE.search(line)
        if match and (not match["codes"] or not re.match(r"\s*#\s*\S", match["rest"])):
            found.append((number, line.strip()))
    return found


def test_every_ignore_names_its_code_and_reason() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{number}: {line}"
        for package in CHECKED
        for path in sorted((ROOT / package).rglob("*.py"))
        if "migrations/versions" not in path.as_posix()
        for number, line in unexplained_ignores(path.read_text(encoding="utf-8"))
    ]
    assert not bad, "a `# type: ignore[code]  # why` is required:\n" + "\n".join(bad)


def test_the_ignore_rule_catches_bare_and_unexplained_ignores() -> None:
    source = "a = f()  # type: ignore\nb = g()  # type: ignore[arg-type]\nc = h()  # type: ignore[misc]  # the SDK is untyped\n"
    assert [n for n, _ in unexplained_ignores(source)] == [1, 2]
