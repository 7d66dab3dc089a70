"""The `chatops` command line: serve, shell, tools, audit, db, policy.

Every failure an operator can cause (configuration, database, policy file) ends in one line on
stderr naming the problem and exit status 2; no traceback is printed. A database that did not answer
(refused, unreachable: it may come back by itself) exits 75 instead, so systemd starts the bot again
while it does not restart a configuration mistake (`deploy/chatops.service`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col

from bot import lifecycle
from bot.config import Settings, load_settings, no_model_message, unknown_variables
from bot.core.errors import EXIT_CONFIG, EXIT_UNAVAILABLE, ChatopsError, StorageError, StorageUnavailable
from bot.lifecycle import add_channels, stop_on_signals, unless_stopped
from bot.logsetup import setup_logging
from bot.sdnotify import ServiceNotifier
from storage.audit_keys import AuditKeyError, AuditKeys, append_key, load_keys
from storage.engine import is_transient, normalise_url
from storage.redact import Redactor

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger("chatops")
T = TypeVar("T")

NO_CHANNEL = (
    "no chat channel is configured and stdin is not a terminal, so there is nobody to chat with. "
    "Set SLACK_BOT_TOKEN (with SLACK_APP_TOKEN or SLACK_SIGNING_SECRET) or FEISHU_APP_ID and FEISHU_APP_SECRET; "
    "see .env.example."
)


CHANNEL_PLATFORMS = ("slack", "feishu", "terminal")


def _channel_spec(spec: str) -> str:
    """`--channel`'s value: a platform the bot speaks on, then (except `terminal`) a channel id."""
    platform, _, channel = spec.partition(":")
    if platform not in CHANNEL_PLATFORMS or (platform != "terminal" and not channel):
        raise argparse.ArgumentTypeError(
            f"{spec!r} is not PLATFORM:CHANNEL with PLATFORM one of {', '.join(CHANNEL_PLATFORMS)} (e.g. slack:C0SALES)"
        )
    return spec


def _settings(args: argparse.Namespace, *, logs: bool = True) -> Settings:
    """Load the configuration; commands that run the bot also install the redacting log handler.
    Names that look like settings but are none are reported (by `chatops serve`, not again by each
    of its workers)."""
    settings = load_settings(env_file=args.env_file)
    if logs:
        setup_logging(settings.log_level, Redactor(settings.secret_values()), json_format=settings.log_format == "json")
    if args.command == "worker":
        return settings
    for problem in unknown_variables(args.env_file):
        if logs:
            log.warning("%s", problem)
        else:
            print(f"chatops: warning: {problem}", file=sys.stderr)
    return settings


def _uses_terminal(settings: Settings, force_terminal: bool) -> bool:
    return force_terminal or not (settings.slack_enabled or settings.feishu_enabled)


def _worker_count(args: argparse.Namespace, settings: Settings) -> int:
    """`--workers`, else CHATOPS_WORKERS, else the CPU cores (on SQLite too: its workers let the
    front's acks take the write lock first, `storage.turnstile`); 0 for the terminal chat, and by
    default on Windows (worker processes use POSIX pipes, Unix sockets and `nice`)."""
    if args.command != "serve" or _uses_terminal(settings, False):
        return 0
    if args.workers is not None:
        return int(args.workers)
    if settings.workers is not None:
        return settings.workers
    if sys.platform == "win32":
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


async def _serve(
    settings: Settings, *, force_terminal: bool, workers: int = 0, env_file: Path | None = None, run_dir: Path | None = None
) -> None:
    if not settings.model_configured:
        raise ChatopsError(no_model_message(settings))
    use_terminal = _uses_terminal(settings, force_terminal)
    service = ServiceNotifier.from_environment()  # systemd's READY / WATCHDOG / STOPPING, when it asks
    watchdog = asyncio.create_task(service.keep_alive())
    stop = stop_on_signals(service, "front" if workers > 0 and not use_terminal else "chatops")
    try:
        if workers > 0 and run_dir is not None and not use_terminal:
            from bot.cli_workers import serve_front

            await serve_front(settings, workers, env_file, run_dir, stop, service)
            return
        await _serve_one(settings, use_terminal, force_terminal, stop, service)
    finally:
        watchdog.cancel()


async def _serve_one(
    settings: Settings, use_terminal: bool, force_terminal: bool, stop: asyncio.Event, service: ServiceNotifier
) -> None:
    """`chatops serve` in one process: the channels (or the terminal chat), the agent and the deliveries."""
    from bot.app import build_app

    app = await unless_stopped(build_app(settings), stop)  # configuration errors are reported first
    if app is None:
        return
    try:
        if use_terminal and not force_terminal and not sys.stdin.isatty():
            raise ChatopsError(NO_CHANNEL)
        if use_terminal:
            await _run_terminal(app, stop)
        else:
            await _run_channels(app, settings, stop, service)
    finally:
        await app.stop()


async def _run_channels(app: App, settings: Settings, stop: asyncio.Event, service: ServiceNotifier) -> None:
    chat_channels = add_channels(app, settings)
    if not await lifecycle.start(app, stop, serve_http=True):
        return
    problems = await app.readiness().problems()
    lifecycle.announce_started(chat_channels, problems, service)
    await stop.wait()


async def _run_terminal(app: App, stop: asyncio.Event) -> None:
    from bot.terminal import TerminalAdapter

    terminal = TerminalAdapter(app.core)
    app.ctx.channels["terminal"] = terminal
    if await lifecycle.start(app, stop, serve_http=True, http_required=False):
        await unless_stopped(terminal.run(), stop)


async def _tools(settings: Settings, channel: str | None = None) -> None:
    from bot.app import build_app
    from bot.core.channel_setup import parse_channel
    from bot.doctor import unconfigured_tools

    app = await build_app(settings, migrate=False)
    missing = unconfigured_tools(settings)
    try:
        specs = list(app.ctx.registry)
        if channel is not None:
            platform, channel_id = parse_channel(channel)
            setup = app.ctx.policy.channel_setup(platform, channel_id)
            specs = setup.specs(app.ctx.registry)
            print(
                f"channel {channel}: model {setup.model or settings.model or '(not set)'}, "
                f"language {setup.language or 'per person'}, "
                f"system prompt {'own' if setup.system_prompt else 'default'}, {len(specs)} tool(s)"
            )
        header = ("tool", "source", "kind", "rule", "service")
        rows = [
            (
                s.name,
                s.source,
                "read" if s.read_only else "write",
                app.ctx.policy.describe(s),
                f"not configured: {missing[s.name]}" if s.name in missing else "ok",
            )
            for s in specs
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
        for row in sorted(rows, key=lambda r: (r[1], r[0])):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        for server, problem in sorted(app.ctx.tool_problems.items()):
            print(f"! MCP server {server!r} failed to start: {problem}")
    finally:
        for close in app.closers:
            result = close()
            if asyncio.iscoroutine(result):
                await result
        await app.ctx.model.close()
        await app.ctx.db.dispose()


async def _doctor(settings: Settings) -> bool:
    from bot.doctor import FAIL, render, run_checks

    findings = await run_checks(settings)
    print(render(findings))
    broken = [f for f in findings if f.status == FAIL]
    print(f"\n{len(broken)} problem(s) to fix." if broken else "\nEverything configured answers.")
    return not broken


async def _chain_audit(url: str, keys: AuditKeys, *, verifying: bool = False) -> None:
    from storage.audit import AuditLog
    from storage.engine import Database

    db = Database(url)
    try:
        await AuditLog(Redactor(keys.secrets()), keys).chain(db)
    except AuditKeyError as exc:
        if not verifying:
            raise ChatopsError(f"audit key: {exc}") from None
        # verify goes on and names the row the key ring cannot check
    finally:
        await db.dispose()


def _serve_audit_page(settings: Settings, host: str, port: int) -> int:
    """`chatops audit serve`: read-only, so it neither migrates nor chains (rows still staged show as a count)."""
    from bot.auditweb.serve import serve_audit_page

    token = settings.audit_token.get_secret_value() if settings.audit_token else None
    with contextlib.suppress(KeyboardInterrupt):
        keys = _cli_keys(settings)
        asyncio.run(
            serve_audit_page(settings.database_url, host, port, token, keys=keys, announce=lambda line: print(line, flush=True))
        )
    return 0


def _cli_keys(settings: Settings) -> AuditKeys:
    """The key ring for the audit commands. A key file is created only while no row is keyed yet
    (a new key could not verify existing keyed rows: that is a missing key, said so)."""
    env = settings.audit_key.get_secret_value() if settings.audit_key else None
    try:
        return load_keys(env, settings.audit_key_path, create=False)
    except AuditKeyError as exc:
        if env or _has_keyed_rows(settings.database_url):
            raise ChatopsError(f"audit key: {exc}") from None
    return load_keys(None, settings.audit_key_path)


def _has_keyed_rows(url: str) -> bool:
    import sqlalchemy as sa

    from storage.engine import make_sync_engine
    from storage.models import AuditEvent

    engine = make_sync_engine(normalise_url(url))
    try:
        with engine.connect() as conn:
            return (
                conn.execute(sa.select(col(AuditEvent.seq)).where(col(AuditEvent.key_id).is_not(None)).limit(1)).first()
                is not None
            )
    except SQLAlchemyError:
        return False  # no table yet: nothing keyed
    finally:
        engine.dispose()


def _rotate_key(settings: Settings) -> None:
    """Add a new current key to the key file and record the rotation, sealed under the old key."""
    if settings.audit_key is not None:
        raise ChatopsError(
            "audit rotate-key: the key comes from CHATOPS_AUDIT_KEY; to rotate, set it to the old key followed "
            "by the new one ('OLD NEW'): the next start or audit command records the rotation"
        )
    path = settings.audit_key_path
    _cli_keys(settings)  # the current ring must exist and be readable
    append_key(path)
    keys = _cli_keys(settings)
    asyncio.run(_chain_audit(settings.database_url, keys))
    print(f"rotated: new rows are sealed with key {keys.current_id}; back up {path} (it holds every key of the ring)")


def _backup(url: str, target: Path) -> int:
    from storage.backup import NotSqlite, backup_sqlite

    if not target.parent.is_dir():  # SQLite would only say "unable to open database file"
        raise ChatopsError(f"cannot back up to {target}: the directory {target.parent} does not exist")
    try:
        pages = backup_sqlite(url, target)
    except NotSqlite:
        raise ChatopsError(
            "DATABASE_URL is not a SQLite file: back PostgreSQL up with pg_dump (README, section Operate)"
        ) from None
    except FileExistsError:
        raise ChatopsError(f"{target} already exists; choose a new file name") from None
    except sqlite3.Error as exc:  # the target's directory is missing or not writable, the source unreadable
        raise ChatopsError(f"cannot back up to {target}: {exc}") from None
    print(f"backed up {pages} pages to {target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatops", description="A chat-ops bot whose write actions wait for human approval.")
    parser.add_argument("--env-file", type=Path, default=Path(".env"), help="dotenv file to read (default: ./.env)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run every configured channel (the terminal chat when none is configured)")
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes that run the agent, executions and deliveries (default: CHATOPS_WORKERS, else the CPU "
        "cores); 0 = everything in this one process",
    )
    worker = sub.add_parser("worker", help="(started by `chatops serve`) one worker process")
    worker.add_argument("--wake-dir", type=Path, required=True, help="where the front's wake-up sockets live (SQLite)")
    worker.add_argument("--index", type=int, default=0, help="the worker's number (0 to N-1), for its share and log lines")
    worker.add_argument("--of", type=int, default=1, help="how many workers this machine runs (N)")
    worker.add_argument("--ready-fd", type=int, help="a pipe to write one byte to once this worker is ready (the supervisor's)")
    sub.add_parser("shell", help="chat with the bot in this terminal")
    tools = sub.add_parser(
        "tools", help="list every tool with its source, read/write, approval rule and whether its service is configured"
    )
    tools.add_argument(
        "--channel", type=_channel_spec, metavar="PLATFORM:CHANNEL", help="only the tools a channel offers, e.g. slack:C0SALES"
    )
    sub.add_parser("doctor", help="check the configuration against the live services; exit 1 if something needed is broken")
    i18n = sub.add_parser("i18n", help="the gettext catalogues of the bot's texts").add_subparsers(
        dest="i18n_command", required=True, metavar="ACTION"
    )
    i18n.add_parser("sync", help="add new sentences of bot/core/texts.py to every catalogue, drop removed ones")
    i18n.add_parser("check", help="list untranslated, fuzzy or mismatched sentences (exit 1 if any)")

    audit = sub.add_parser("audit", help="read and check the audit trail").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    lst = audit.add_parser("list", help="recent audit rows, filtered")
    lst.add_argument("--user", help="actor id (substring match)")
    lst.add_argument("--tool", help="tool name")
    lst.add_argument("--status", help="status, e.g. pending, approved, succeeded, refused")
    lst.add_argument("--since", help="2h, 3d, or an ISO date/time")
    lst.add_argument("--limit", type=int, default=200, help="at most this many rows (default 200)")
    show = audit.add_parser("show", help="the whole trail of one run (or of an approval's run)")
    show.add_argument("run_id", metavar="RUN_ID")
    export = audit.add_parser("export", help="every row with its hashes, as JSON lines or CSV")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--output", type=Path, help="file to write (default: stdout)")
    verify = audit.add_parser("verify", help="check the keyed chain, staged rows and anchors; names the first bad row")
    verify.add_argument(
        "--anchors", type=Path, help="anchor file (CHATOPS_AUDIT_ANCHOR_FILE, or `chatops audit anchor --append`)"
    )
    audit.add_parser("rotate-key", help="seal new audit rows with a new key (kept in the key file with the old ones)")
    anchor = audit.add_parser("anchor", help="print the chain head (seq, hash) to keep outside the database")
    anchor.add_argument("--append", type=Path, help="also append it to this file")
    page = audit.add_parser("serve", help="a read-only web page over the audit trail (search, timelines, downloads)")
    page.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need CHATOPS_AUDIT_TOKEN)"
    )
    page.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; 0 picks a free one)")

    approval = sub.add_parser("approval", help="inspect approvals").add_subparsers(
        dest="approval_command", required=True, metavar="ACTION"
    )
    shown = approval.add_parser("show", help="one approval's card with every argument in full")
    shown.add_argument("approval_id", metavar="APPROVAL_ID")

    db = sub.add_parser("db", help="database maintenance").add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db.add_parser("upgrade", help="apply schema migrations (also done automatically at start-up)")
    backup = sub.add_parser("backup", help="copy a live SQLite database into FILE (PostgreSQL: use pg_dump)")
    backup.add_argument("file", type=Path, metavar="FILE", help="the copy to write (must not exist)")
    policy = sub.add_parser("policy", help="policy file tools").add_subparsers(
        dest="policy_command", required=True, metavar="ACTION"
    )
    check = policy.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path, metavar="FILE")
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bot import cli_audit

    if args.command in ("serve", "shell"):
        settings = _settings(args)
        workers, run_dir = _worker_count(args, settings), None
        if workers > 0 and settings.model_configured:
            from bot.supervisor import prepare_run_dir  # imports only the standard library

            run_dir = prepare_run_dir(settings.metrics_dir)  # before anything imports prometheus_client
        serving = _serve(
            settings, force_terminal=args.command == "shell", workers=workers, env_file=args.env_file, run_dir=run_dir
        )
        with contextlib.suppress(KeyboardInterrupt):
            lifecycle.run(serving, settings)
        return 0
    if args.command == "worker":
        from bot.cli_workers import work
        from bot.core.sweeper import Share

        settings = _settings(args)
        with contextlib.suppress(KeyboardInterrupt):
            lifecycle.run(work(settings, args.wake_dir, Share(args.index, args.of), args.ready_fd), settings)
        return 0
    if args.command == "tools":
        asyncio.run(_tools(_settings(args), args.channel))
        return 0
    if args.command == "i18n":
        from bot import cli_i18n
        from bot.core.i18n import LANGUAGES

        if args.i18n_command == "sync":
            for lang in LANGUAGES:
                print(f"{lang}: {cli_i18n.sync(lang)} sentence(s) added or changed")
        found = [p for lang in LANGUAGES for p in cli_i18n.problems(lang)]
        print("\n".join(found) or "every sentence is translated in " + ", ".join(LANGUAGES))
        return 1 if found else 0
    if args.command == "doctor":
        settings = load_settings(env_file=args.env_file)
        setup_logging("ERROR", Redactor(settings.secret_values()))
        return 0 if asyncio.run(_doctor(settings)) else 1
    if args.command == "policy":
        from bot.core.policy_file import load_policy_file

        policy = load_policy_file(args.file, named_by=None)  # the path came from the command line
        print(f"OK: {args.file} is a valid policy ({policy.source})")
        return 0
    if args.command == "audit" and args.audit_command == "serve":
        return _serve_audit_page(_settings(args), args.host, args.port)
    settings = _settings(args, logs=False)
    if args.command == "backup":
        return _backup(settings.database_url, args.file)
    if args.command == "db":
        from storage.migrate import SchemaFromNewerVersion, current_revision, upgrade

        try:
            upgrade(settings.database_url)
        except SchemaFromNewerVersion as exc:
            raise StorageError(f"DATABASE_URL: {exc}") from None
        print(f"database is at revision {current_revision(settings.database_url)}")
        return 0
    if args.command == "audit" and args.audit_command == "rotate-key":
        _rotate_key(settings)
        return 0
    url = settings.database_url
    if args.command == "approval":
        from bot.cli_approval import approval_show

        approval_show(url, args.approval_id)
        return 0
    keys = _cli_keys(settings)
    asyncio.run(_chain_audit(url, keys, verifying=args.audit_command == "verify"))  # rows a stopped bot staged
    match args.audit_command:
        case "list":
            cli_audit.audit_list(url, user=args.user, tool=args.tool, status=args.status, since=args.since, limit=args.limit)
        case "show":
            cli_audit.audit_show(url, args.run_id)
        case "export":
            cli_audit.audit_export(url, args.format, args.output)
        case "verify":
            return 0 if cli_audit.audit_verify(url, args.anchors, keys) else 1
        case "anchor":
            cli_audit.audit_anchor(url, args.append)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run(argv)
    except ChatopsError as exc:
        print(f"chatops: error: {exc}", file=sys.stderr)
        code = EXIT_UNAVAILABLE if isinstance(exc, StorageUnavailable) else EXIT_CONFIG
    except BrokenPipeError:  # the reader left (`chatops audit list | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    except SQLAlchemyError as exc:
        detail = Redactor().redact_text(str(exc).splitlines()[0])[:300]
        print(f"chatops: error: DATABASE_URL: the database cannot be used ({detail})", file=sys.stderr)
        code = EXIT_UNAVAILABLE if is_transient(exc) else EXIT_CONFIG
    except Exception as exc:
        if os.environ.get("CHATOPS_LOG_LEVEL", "").upper() == "DEBUG":  # asked for: the trace, through the redactor
            # The command's own handler knows the configured secrets; only a command that failed before
            # installing one gets a new handler (which still masks what looks like a key or token).
            if not any(handler.get_name() == "chatops" for handler in logging.getLogger().handlers):
                setup_logging("DEBUG", Redactor())
            log.error("unexpected failure", exc_info=True)
        print(f"chatops: internal error ({type(exc).__name__}); run with CHATOPS_LOG_LEVEL=DEBUG for details", file=sys.stderr)
        code = 1
    sys.exit(code)
