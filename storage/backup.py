"""`chatops backup FILE`: a consistent copy of a live SQLite database, with SQLite's online backup
API (`sqlite3.Connection.backup`), safe while the bot writes (WAL mode). PostgreSQL databases are
backed up with `pg_dump` (see the README, section Operate)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from storage.engine import normalise_url


class NotSqlite(ValueError):
    """The database is not a SQLite file: use the server's own tools."""


def backup_sqlite(url: str, target: Path, *, pages_per_step: int = 1024) -> int:
    """Copy the database at `url` into `target` (which must not exist). Returns the number of pages."""
    urls = normalise_url(url)
    source_path = urls.sync_url.database
    if not urls.is_sqlite or not source_path or source_path == ":memory:":
        raise NotSqlite(url)
    if target.exists():
        raise FileExistsError(str(target))
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)
    destination = sqlite3.connect(target)
    try:
        source.backup(destination, pages=pages_per_step)  # other writers may go on between steps
        pages = int(destination.execute("PRAGMA page_count").fetchone()[0])
        if destination.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError(f"the copy in {target} fails integrity_check")
        return pages
    finally:
        destination.close()
        source.close()
