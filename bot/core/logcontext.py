"""Ids that log lines carry when they are known: run, approval, conversation.

`with log_ids(run_id=..., conversation_id=...):` sets them for everything logged inside (and in
tasks started inside: asyncio copies context variables into new tasks); a single call can pass
them as `extra={"run_id": ...}` instead. `bot.logsetup` writes them into JSON log lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

FIELDS = ("run_id", "approval_id", "conversation_id")
_current: ContextVar[dict[str, str]] = ContextVar("chatops_log_ids", default={})  # noqa: B039 - never mutated


@contextlib.contextmanager
def log_ids(**ids: str | None) -> Iterator[None]:
    """Attach ids (only those in FIELDS, and not None) to every log record made inside the block."""
    unknown = set(ids) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log ids: {sorted(unknown)}")
    token = _current.set({**_current.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _current.reset(token)


def current_ids() -> dict[str, str]:
    """The ids set by the enclosing `log_ids` blocks."""
    return dict(_current.get())
