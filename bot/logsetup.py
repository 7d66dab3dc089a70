"""Logging: one stderr handler whose filter redacts secrets from every record, at any level.

Library loggers that print request bodies (lark-oapi at DEBUG, Bolt on a bad signature) go
through the same filter; Bolt's signature-failure logger is additionally kept at WARNING.
lark-oapi installs its own stdout handler on its `Lark` logger (`[Lark] ...` lines) when it is
imported: `bot.feishu.sdk` removes it right after, so those records reach this handler too.

`CHATOPS_LOG_FORMAT=json` writes one JSON object per line (python-json-logger): `time`, `level`,
`logger`, `message`, the run/approval/conversation ids when known (`bot.core.logcontext` or
`extra=`), and `exc_info` (the redacted traceback) when there is one.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from bot.core.logcontext import FIELDS, current_ids
from storage.redact import Redactor

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


class JsonLines(JsonFormatter):
    """One JSON object per record, with a fixed set of keys (never arbitrary `extra` values)."""

    def __init__(self) -> None:
        super().__init__(json_ensure_ascii=False)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["time"] = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.getMessage()
        ids = current_ids()
        for name in FIELDS:
            value = getattr(record, name, None) or ids.get(name)
            if value:
                log_data[name] = str(value)
        if record.exc_text:
            log_data["exc_info"] = record.exc_text

    converter = staticmethod(time.gmtime)


def redacting_handler(stream: TextIO, redactor: Redactor, *, json_format: bool = False) -> logging.Handler:
    """A handler whose every record is redacted (and made single-line) before it is written."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines() if json_format else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactingFilter(redactor))
    return handler


def setup_logging(level: str, redactor: Redactor, *, json_format: bool = False) -> None:
    """The process's log: one redacting stderr handler (replacing one installed earlier by this function)."""
    handler = redacting_handler(sys.stderr, redactor, json_format=json_format)
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
    psycopg_log = logging.getLogger("psycopg")
    if not any(isinstance(f, _PipelineEcho) for f in psycopg_log.filters):
        psycopg_log.addFilter(_PipelineEcho())


class _PipelineEcho(logging.Filter):
    """psycopg's "error ignored terminating <pipeline>" when a connection drops inside a pipeline: the
    error itself is raised to the step, which is tried again (`Database.run`) or reported; this echo
    only doubled a passing fault as a warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error ignored terminating")
