"""Shared fixtures: a scripted model server, databases (SQLite file, PostgreSQL schema), and
running bots built exactly as `chatops serve` builds them.

Any call to a real model endpoint fails: the default OPENAI_BASE_URL points at a closed port and
no `.env` is ever read (tests run in a temporary working directory).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bot.app import App, build_app
from bot.config import Settings, load_settings
from bot.core.events import User
from bot.logsetup import redacting_handler
from bot.terminal import TerminalAdapter
from storage.engine import Database
from storage.migrate import upgrade
from storage.redact import Redactor
from tests.fakes.openai_server import ScriptedModel
from tools.registry import Toolset

pytest_plugins = ["tests.git_helpers"]  # the `repo` fixture for the MCP tests

CLOSED_MODEL_URL = "http://127.0.0.1:9/v1"
# Every bot a test builds registers its configured secrets here, as `chatops serve` does for its log.
SUITE_LOG_REDACTOR = Redactor()


@pytest.fixture(scope="session", autouse=True)
def _whole_suite_logs_at_debug(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The whole suite runs with the product's redacting log handler at DEBUG; afterwards, no
    configured secret (tokens, keys, passwords of every bot the tests built) may be in that log."""
    path = tmp_path_factory.mktemp("suite-log") / "chatops-debug.log"
    with path.open("w", encoding="utf-8") as stream:
        handler = redacting_handler(stream, SUITE_LOG_REDACTOR)
        root = logging.getLogger()
        previous = root.level
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        logging.getLogger("aiosqlite").setLevel(logging.INFO)  # one DEBUG line per statement, in a thread
        yield
        root.removeHandler(handler)
        root.setLevel(previous)
    text = path.read_text(encoding="utf-8")
    leaked = sorted({secret for secret in SUITE_LOG_REDACTOR.known if secret in text})
    assert not leaked, f"{len(leaked)} configured secret(s) reached the DEBUG log {path}"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No developer .env, no real model endpoint, no inherited chatops variables."""
    for name in list(os.environ):
        ours = name.startswith(("CHATOPS_", "SLACK_", "FEISHU_", "SMTP_", "HUBSPOT_", "OPENAI_")) or name == "DATABASE_URL"
        if ours and name != "CHATOPS_TEST_POSTGRES_URL":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", CLOSED_MODEL_URL)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
async def model() -> AsyncIterator[ScriptedModel]:
    async with ScriptedModel() as server:
        yield server


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'chatops.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the test PostgreSQL (CHATOPS_TEST_POSTGRES_URL), dropped afterwards."""
    base = os.environ.get("CHATOPS_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("CHATOPS_TEST_POSTGRES_URL is not set: no PostgreSQL to test against")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(sa.make_url(base).set(drivername="postgresql+psycopg"))
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}&application_name={schema}"
    with engine.begin() as conn:
        # Connections a failed test left open would block the DROP: end them first.
        conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :a"), {"a": schema})
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Both backends: the test runs once on SQLite and once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """A migrated database on both backends, as `Database` (the bot's handle), disposed afterwards."""
    await asyncio.to_thread(upgrade, db_url)
    database = Database(db_url)
    yield database
    await database.dispose()


# What the suite's settings change from the product's defaults, set back (the benchmarks use these).
PRODUCT_DEFAULTS = {"CHATOPS_PROGRESS_AFTER": str(Settings.model_fields["progress_after"].default)}


def make_settings(model_url: str, database_url: str, **env: str) -> Settings:
    """Settings exactly as load_settings builds them, from an explicit environment."""
    environ = {
        "OPENAI_BASE_URL": model_url,
        "CHATOPS_MODEL": "scripted-model",
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "DATABASE_URL": database_url,
        "CHATOPS_PORT": "0",
        "CHATOPS_PROGRESS_AFTER": "0",  # progress lines at once, so tests see them (the delay: test_progress.py)
        **env,
    }
    return load_settings(env_file=None, environ=environ)


class Bots:
    """Builds and starts bots for a test; stops them all at teardown."""

    def __init__(self, model: ScriptedModel, database_url: str) -> None:
        self.model = model
        self.database_url = database_url
        self.apps: list[App] = []

    async def start(
        self,
        *,
        toolsets: list[Toolset] = (),  # type: ignore[assignment]
        serve_http: bool = False,
        database_url: str | None = None,
        **env: str,
    ) -> App:
        settings = make_settings(self.model.url, database_url or self.database_url, **env)
        SUITE_LOG_REDACTOR.add(settings.secret_values())
        app = await build_app(settings)
        for toolset in toolsets:
            for spec in toolset.specs:
                app.ctx.registry.add(spec)
        self.apps.append(app)
        app._serve_http = serve_http  # type: ignore[attr-defined]
        return app

    async def run(self, app: App) -> App:
        await app.start(serve_http=getattr(app, "_serve_http", False))
        return app

    async def stop_all(self) -> None:
        for app in reversed(self.apps):
            if app.runner is not None or app._sweep_task is not None:
                await app.stop()
        self.apps.clear()


@pytest.fixture
async def bots(model: ScriptedModel, sqlite_url: str) -> AsyncIterator[Bots]:
    """Bots on a per-test SQLite file (use `bots.start(database_url=...)` for PostgreSQL)."""
    factory = Bots(model, sqlite_url)
    yield factory
    await factory.stop_all()


class TerminalBot:
    """A running bot with the terminal adapter writing into a buffer."""

    def __init__(self, app: App, adapter: TerminalAdapter, out: io.StringIO) -> None:
        self.app, self.adapter, self.out = app, adapter, out

    @property
    def core(self) -> Any:
        return self.app.core

    async def say(self, text: str) -> None:
        """Type a line and wait until the bot has finished everything it started."""
        await self.adapter.handle_line(text)
        await self.app.ctx.tasks.idle()

    def transcript(self) -> str:
        return self.out.getvalue()


TerminalFactory = Callable[..., Awaitable[TerminalBot]]


@pytest.fixture
async def terminal_bot(bots: Bots) -> TerminalFactory:
    """`await terminal_bot(toolsets=[...], **env)` -> a started bot chatting through the terminal adapter."""

    async def start(user: User | None = None, **kwargs: Any) -> TerminalBot:
        app = await bots.start(**kwargs)
        out = io.StringIO()
        adapter = TerminalAdapter(app.core, out=out, user=user or User("terminal", "alice", "local", "alice"))
        app.ctx.channels["terminal"] = adapter
        await bots.run(app)
        return TerminalBot(app, adapter, out)

    return start


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `long` first: with several workers (pytest-xdist) they start at once instead of last."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
