"""Schema migrations with Alembic, applied at start-up and by `chatops db upgrade`.

Concurrent starts of several replicas on PostgreSQL are serialised with an advisory lock,
so exactly one of them migrates and the others find the schema current.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError

from storage.engine import make_sync_engine, normalise_url

MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_KEY = 7_240_002


class SchemaFromNewerVersion(Exception):
    """The database was migrated by a newer chatops: this code does not know its revision."""

    def __init__(self, revision: str, head: str | None) -> None:
        super().__init__(
            f"the database is at revision {revision}, newer than this chatops knows (up to {head}): "
            "it was upgraded by a newer version; run that version (or restore a backup taken before the upgrade)"
        )


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(url: str) -> str | None:
    engine = make_sync_engine(normalise_url(url))
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def is_known(revision: str | None) -> bool:
    """True when this code has a migration for `revision` (None: an empty database)."""
    if revision is None:
        return True
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:  # alembic's answer for a revision it cannot locate
        return False


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (default: the newest). Raises
    SchemaFromNewerVersion when a newer chatops already migrated it past what this code knows."""
    urls = normalise_url(url)
    engine = make_sync_engine(urls)
    cfg = alembic_config()
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k, hashtext(current_schema()))"), {"k": _LOCK_KEY})
            current = MigrationContext.configure(conn).get_current_revision()
            if not is_known(current):
                raise SchemaFromNewerVersion(str(current), head_revision())
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def autogenerate(url: str, message: str) -> None:
    """Developer helper: write a new revision from the difference between models and `url`."""
    engine = make_sync_engine(normalise_url(url))
    cfg = alembic_config()
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.revision(cfg, message=message, autogenerate=True)
    finally:
        engine.dispose()
