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


def test_json_lines_carry_ids_and_stay_redacted():
    import json

    from bot.core.logcontext import log_ids

    stream = io.StringIO()
    logger = logging.getLogger("chatops.test.json")
    logger.propagate = False
    handler = redacting_handler(stream, Redactor(["hunter2-json"]), json_format=True)
    logger.addHandler(handler)
    try:
        with log_ids(run_id="run-1", conversation_id="conv-1"):
            logger.warning("token %s\nsecond line", "hunter2-json", extra={"approval_id": "ap-1"})
            try:
                raise ValueError("hunter2-json inside")
            except ValueError:
                logger.exception("failed")
        logger.info("no ids")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3 and "hunter2-json" not in stream.getvalue()
    first, failure, plain = records
    assert first["level"] == "WARNING" and first["logger"] == "chatops.test.json" and first["time"].endswith("Z")
    assert (first["run_id"], first["conversation_id"], first["approval_id"]) == ("run-1", "conv-1", "ap-1")
    assert "ValueError" in failure["exc_info"] and failure["run_id"] == "run-1"
    assert "run_id" not in plain
