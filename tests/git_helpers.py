"""A temporary git repository with one staged change, for the tests that drive mcp-server-git."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

STAGED_FILE = "notes.txt"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=Test", "-c", "user.email=test@example.com", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with one commit and one staged, uncommitted change to `STAGED_FILE`."""
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    (path / STAGED_FILE).write_text("one\n")
    git(path, "add", STAGED_FILE)
    git(path, "commit", "-q", "-m", "initial")
    (path / STAGED_FILE).write_text("one\ntwo\n")
    git(path, "add", STAGED_FILE)
    return path
