"""Anchors: the chain's head (seq, hash, time) written outside the database.

An attacker who can write to the database cannot forge keyed rows, but can still delete the
newest ones (truncation) or the whole table. An anchor file kept elsewhere (another disk, a
write-once store, a log shipper's input) remembers heads the chain once had; `chatops audit
verify --anchors FILE` checks each is still there. The running bot appends the head at an
interval (`Anchorer`), and `chatops audit anchor --append FILE` does it by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from storage.engine import Database
from storage.models import AuditEvent

log = logging.getLogger("chatops.audit")
EMPTY_HEAD = (0, "0" * 64)


class AnchorFileError(Exception):
    """A line of the anchor file is not an anchor."""


@dataclass(frozen=True)
class Anchor:
    line: int
    seq: int
    hash: str


def anchor_line(seq: int, digest: str) -> str:
    return json.dumps({"seq": seq, "hash": digest, "at": datetime.now(UTC).isoformat()})


def append_anchor(path: Path, seq: int, digest: str) -> str:
    """Append one anchor line (flushed to disk) and return it."""
    line = anchor_line(seq, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return line


def read_anchors(path: Path) -> list[Anchor]:
    anchors = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            anchors.append(Anchor(number, int(value["seq"]), str(value["hash"])))
        except (ValueError, KeyError, TypeError):
            raise AnchorFileError(f"{path}:{number}: not an anchor line") from None
    return anchors


def last_anchor(path: Path) -> tuple[int, str] | None:
    try:
        anchors = read_anchors(path)
    except (OSError, AnchorFileError):
        return None
    return (anchors[-1].seq, anchors[-1].hash) if anchors else None


async def read_head(db: Database) -> tuple[int, str]:
    async with db.transaction(read=True) as session:
        last = (
            await session.execute(
                sa.select(col(AuditEvent.seq), col(AuditEvent.hash)).order_by(col(AuditEvent.seq).desc()).limit(1)
            )
        ).first()
    return (last[0], last[1]) if last else EMPTY_HEAD


class Anchorer:
    """Appends the chain head to `path` every `interval` seconds when it moved."""

    def __init__(self, db: Database, path: Path, interval: float, chain: Any = None) -> None:
        self.db = db
        self.path = path
        self.interval = interval
        self._chain = chain  # awaitable factory run before reading the head (chains staged rows)
        self._last = last_anchor(path)
        self._stop = asyncio.Event()

    async def anchor_now(self) -> None:
        if self._chain is not None:
            await self._chain()
        head = await read_head(self.db)
        if head != self._last and head != EMPTY_HEAD:
            await asyncio.to_thread(append_anchor, self.path, *head)
            self._last = head

    async def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                await self.anchor_now()
            except Exception as exc:  # noqa: BLE001 - anchoring must never stop the bot
                log.warning("audit: could not write an anchor to %s (%s)", self.path, type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    def stop(self) -> None:
        self._stop.set()
