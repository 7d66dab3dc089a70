"""Logging: one stderr handler whose filter redacts secrets from every record, at any level.

Library loggers that print request bodies (lark-oapi at DEBUG, Bolt on a bad signature) go
through the same filter; Bolt's signature-failure logger is additionally kept at WARNING.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from storage.redact import Redactor


class RedactingFilter(logging.Filter):
    """Formats the record's message once, redacts it, and drops args (so nothing leaks later)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        record.msg = self.redactor.redact_text(message).replace("\r", "\\r").replace("\n", "\\n ")
        record.args = None
        if record.exc_info:
            # Operators keep the traceback, redacted like everything else.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        # Another handler's filter may have formatted the traceback already: redact whatever is there.
        if record.exc_text:
            record.exc_text = self.redactor.redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor.redact_text(record.stack_info)
        return True


def redacting_handler(stream: TextIO, redactor: Redactor) -> logging.Handler:
    """A handler whose every record is redacted (and made single-line) before it is written."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(redactor))
    return handler


def setup_logging(level: str, redactor: Redactor) -> None:
    """The process's log: one redacting stderr handler (replacing one installed earlier by this function)."""
    handler = redacting_handler(sys.stderr, redactor)
    handler.set_name("chatops")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "chatops" or (type(old) is logging.StreamHandler and not old.filters):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in (
        "slack_bolt.middleware.request_verification",
        "aiohttp.access",
        "httpx",
        "httpcore",
        "httpx2",
        "httpcore2",
        "openai",
        "alembic",
        "aiosqlite",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
