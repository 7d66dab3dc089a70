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


async def test_a_background_task_stopped_by_a_passing_database_fault_is_one_warning_line(caplog):
    """A dropped connection under a background task (the audit chainer, say) was an ERROR with a
    stack trace, 16 of them in one fault run; its work is picked up again, so it is one warning line.
    Anything else stays an error with its trace."""
    import asyncio

    import sqlalchemy as sa

    from bot.core.context import TaskSet

    async def dropped() -> None:
        raise sa.exc.OperationalError("SELECT 1", {}, ConnectionError("server closed the connection"))

    async def broken() -> None:
        raise KeyError("bug")

    tasks = TaskSet()
    caplog.set_level(logging.WARNING, logger="chatops")
    await asyncio.gather(tasks.spawn(dropped(), "audit-chain"), tasks.spawn(broken(), "other"), return_exceptions=True)
    # (each task's done callbacks ran before gather's: `TaskSet` added its own first)
    (passing,) = [r for r in caplog.records if "audit-chain" in r.getMessage()]
    (bug,) = [r for r in caplog.records if "other" in r.getMessage()]
    assert passing.levelno == logging.WARNING and passing.exc_info is None and not passing.exc_text
    assert bug.levelno == logging.ERROR and bool(bug.exc_info or bug.exc_text)


def test_psycopgs_echo_of_a_dropped_pipeline_is_not_logged_again():
    from bot.logsetup import setup_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        setup_logging("INFO", Redactor())
        psycopg_log = logging.getLogger("psycopg")
        echo = psycopg_log.makeRecord(
            "psycopg", logging.WARNING, __file__, 1, "error ignored terminating %r: %s", ("p", "x"), None
        )
        other = psycopg_log.makeRecord("psycopg", logging.WARNING, __file__, 1, "something else", (), None)
        assert not psycopg_log.filter(echo) and psycopg_log.filter(other)
    finally:
        root.handlers[:], root.level = handlers, level
