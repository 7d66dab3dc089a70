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
            record.exc_text = self.redactor.redact_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def redacting_handler(stream: TextIO, redactor: Redactor) -> logging.Handler:
    """A handler whose every record is redacted (and made single-line) before it is written."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(redactor))
    return handler


def setup_logging(level: str, redactor: Redactor) -> None:
    handler = redacting_handler(sys.stderr, redactor)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("slack_bolt.middleware.request_verification", "aiohttp.access", "httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
