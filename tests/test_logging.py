"""The log pipeline: every record is redacted, whatever handler formatted it first."""

from __future__ import annotations

import io
import logging

from bot.logsetup import redacting_handler
from storage.redact import Redactor

SECRET = "canary-log-secret-91f2c3"


def test_a_traceback_formatted_by_another_handler_is_still_redacted():
    first, second = io.StringIO(), io.StringIO()
    log = logging.getLogger("chatops.test.logging")
    weak = redacting_handler(first, Redactor())  # knows no secret (say, configured for another bot)
    strong = redacting_handler(second, Redactor([SECRET]))
    log.addHandler(weak)
    log.addHandler(strong)
    try:
        try:
            raise RuntimeError(f"boom {SECRET}")
        except RuntimeError:
            log.exception("failed with %s", SECRET)
    finally:
        log.removeHandler(weak)
        log.removeHandler(strong)
    assert "RuntimeError: boom" in second.getvalue() and "Traceback" in second.getvalue()
    assert SECRET not in second.getvalue()


def test_log_lines_cannot_be_forged_with_newlines():
    out = io.StringIO()
    log = logging.getLogger("chatops.test.injection")
    handler = redacting_handler(out, Redactor())
    log.addHandler(handler)
    try:
        log.warning("user said %s", "hello\n2026-01-01 00:00:00 INFO chatops: approved by admin")
    finally:
        log.removeHandler(handler)
    assert len(out.getvalue().strip().splitlines()) == 1
