"""`chatops doctor`: the configuration checked against the live services, one row per check.

Each check talks to the real service the way the bot will (the model endpoint with a tiny
completion that offers a tool; Slack `auth.test` with its granted scopes and the Socket Mode token;
Feishu's tenant token, bot info and event transport; SMTP up to the login, no mail sent; HubSpot;
every MCP server; the database and its migrations; the policy file) and says how to fix what is
wrong. A check of something not configured is skipped. Exit status 1 when a needed check fails.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import openai
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from bot.config import Settings, no_model_message
from storage.redact import Redactor

if TYPE_CHECKING:
    from slack_sdk.errors import SlackApiError

CHECK_TIMEOUT = 20.0
OK, FAIL, WARN, SKIP = "ok", "FAIL", "warn", "skip"
PING_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "ping",
        "description": "Answers pong.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


@dataclass(frozen=True)
class Finding:
    check: str
    status: str
    detail: str
    fix: str = ""


Check = Callable[[Settings], Awaitable[list[Finding]]]


def unconfigured_tools(settings: Settings) -> dict[str, str]:
    """Built-in tools whose service is not configured -> the variable to set."""
    missing = {}
    if not (settings.smtp_host and settings.smtp_from):
        missing["send_email"] = "set SMTP_HOST and SMTP_FROM"
    if not settings.slack_enabled:
        missing["notify_slack"] = "set SLACK_BOT_TOKEN"
    if not settings.feishu_webhook_url:
        missing["notify_feishu"] = "set FEISHU_WEBHOOK_URL"
    return missing


# ---------------------------------------------------------------------- the model
async def check_model(settings: Settings) -> list[Finding]:
    if not settings.model_configured:
        return [
            Finding("model", FAIL, "not configured", no_model_message(settings).removeprefix("no language model is configured: "))
        ]
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else "not-needed-for-this-endpoint"
    client = openai.AsyncOpenAI(api_key=key, base_url=settings.openai_base_url, timeout=15, max_retries=0)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Reply with the word OK."}]
    try:
        await client.chat.completions.create(model=settings.model or "", messages=messages, tools=[PING_TOOL])
    except openai.AuthenticationError:
        return [Finding("model", FAIL, "the endpoint refused the key (401)", "check OPENAI_API_KEY")]
    except openai.NotFoundError:
        return [Finding("model", FAIL, f"model {settings.model!r} not found (404)", "check CHATOPS_MODEL and OPENAI_BASE_URL")]
    except openai.BadRequestError as exc:
        detail = f"the endpoint refused a completion with tools (400: {_short(exc.message)})"
        return [Finding("model", FAIL, detail, "use a model with function calling (tools), e.g. gpt-4o-mini")]
    except openai.APIStatusError as exc:
        return [
            Finding(
                "model", FAIL, f"the endpoint answered HTTP {exc.status_code}", "check OPENAI_BASE_URL and the provider's status"
            )
        ]
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        return [Finding("model", FAIL, f"unreachable ({type(exc).__name__})", "check OPENAI_BASE_URL and the network")]
    finally:
        await client.close()
    return [Finding("model", OK, f"{settings.model} answered a completion with tools")]


# ---------------------------------------------------------------------- storage and policy
async def check_database(settings: Settings) -> list[Finding]:
    from storage.engine import normalise_url
    from storage.migrate import current_revision, head_revision, is_known

    urls = normalise_url(settings.database_url)
    sqlite_file = urls.sync_url.database if urls.is_sqlite else None
    if sqlite_file and sqlite_file != ":memory:" and not await asyncio.to_thread(Path(sqlite_file).exists):
        # Looking would create an empty file: a check changes nothing.
        fix = "run `chatops db upgrade` (or start `chatops serve`, which creates it)"
        return [Finding("database", FAIL, f"no database file at {sqlite_file} yet, code expects {head_revision()}", fix)]
    try:
        current = await asyncio.to_thread(current_revision, settings.database_url)
    except Exception as exc:  # noqa: BLE001 - reported in one redacted line
        detail = Redactor(settings.secret_values()).redact_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return [Finding("database", FAIL, f"cannot connect ({_short(detail)})", "check DATABASE_URL and that the server runs")]
    head = head_revision()
    if not is_known(current):
        fix = "run the chatops version that upgraded it (or restore a backup taken before the upgrade)"
        return [Finding("database", FAIL, f"schema at {current}, newer than this chatops knows (up to {head})", fix)]
    if current != head:
        return [Finding("database", FAIL, f"schema at {current or 'nothing'}, code expects {head}", "run `chatops db upgrade`")]
    return [Finding("database", OK, f"reachable, migrations current ({head})")]


async def check_policy(settings: Settings) -> list[Finding]:
    if settings.policy_file is None:
        return [Finding("policy", OK, "no CHATOPS_POLICY: every write tool needs an approval by the asker")]
    from bot.core.errors import ChatopsError
    from bot.core.policy_file import load_policy_file

    try:
        policy = load_policy_file(settings.policy_file)
    except ChatopsError as exc:
        return [Finding("policy", FAIL, _short(str(exc)), f"fix {settings.policy_file} (`chatops policy check FILE`)")]
    return [Finding("policy", OK, f"{settings.policy_file} is valid ({policy.source})")]


# ---------------------------------------------------------------------- Slack
async def check_slack(settings: Settings) -> list[Finding]:
    if not settings.slack_enabled:
        return [Finding("slack", SKIP, "not configured (SLACK_BOT_TOKEN)")]
    from slack_sdk.errors import SlackApiError

    return [*await _slack_auth(settings, SlackApiError), await _slack_transport(settings, SlackApiError)]


async def _slack_auth(settings: Settings, api_error: type[SlackApiError]) -> list[Finding]:
    from slack_sdk.web.async_client import AsyncWebClient

    from bot.slack.scopes import NEEDED_BOT_SCOPES

    assert settings.slack_bot_token is not None
    client = AsyncWebClient(token=settings.slack_bot_token.get_secret_value(), base_url=settings.slack_api_url, timeout=10)
    try:
        response = await client.auth_test()
    except api_error as exc:
        from bot.slack.api_error import error_code

        error = error_code(exc, "error")
        return [Finding("slack auth.test", FAIL, f"Slack answered {error}", "check SLACK_BOT_TOKEN (xoxb-…, from Install App)")]
    except Exception as exc:  # noqa: BLE001 - network trouble, one line
        return [Finding("slack auth.test", FAIL, f"unreachable ({type(exc).__name__})", "check the network and SLACK_API_URL")]
    found = [Finding("slack auth.test", OK, f"bot {response.get('user_id')} in team {response.get('team_id')}")]
    headers = {k.lower(): v for k, v in (response.headers or {}).items()}
    granted = {s.strip() for s in str(headers.get("x-oauth-scopes", "")).split(",") if s.strip()}
    missing = sorted(NEEDED_BOT_SCOPES - granted)
    if "x-oauth-scopes" not in headers:
        found.append(Finding("slack scopes", WARN, "Slack did not say which scopes the token has"))
    elif missing:
        fix = "add them under OAuth & Permissions (or recreate the app from manifest.yml), then reinstall the app"
        found.append(Finding("slack scopes", FAIL, f"missing: {', '.join(missing)}", fix))
    else:
        found.append(Finding("slack scopes", OK, f"all {len(NEEDED_BOT_SCOPES)} needed scopes granted"))
    return found


async def _slack_transport(settings: Settings, api_error: type[SlackApiError]) -> Finding:
    from slack_sdk.web.async_client import AsyncWebClient

    if settings.slack_app_token is None:
        return Finding("slack mode", OK, "HTTP mode: Slack must reach POST /slack/events (SLACK_SIGNING_SECRET set)")
    client = AsyncWebClient(base_url=settings.slack_api_url, timeout=10)
    try:
        await client.apps_connections_open(app_token=settings.slack_app_token.get_secret_value())
    except api_error as exc:
        from bot.slack.api_error import error_code

        error = error_code(exc, "error")
        fix = "check SLACK_APP_TOKEN (xapp-…, an app-level token with connections:write) and that Socket Mode is on"
        return Finding("slack socket mode", FAIL, f"apps.connections.open: Slack answered {error}", fix)
    except Exception as exc:  # noqa: BLE001 - network trouble, one line
        return Finding("slack socket mode", FAIL, f"unreachable ({type(exc).__name__})", "check the network")
    return Finding("slack socket mode", OK, "the app token opens Socket Mode connections")


# ---------------------------------------------------------------------- Feishu
async def check_feishu(settings: Settings) -> list[Finding]:
    if not settings.feishu_enabled:
        return [Finding("feishu", SKIP, "not configured (FEISHU_APP_ID, FEISHU_APP_SECRET)")]
    from bot.feishu.client import CredentialsRejected, FeishuApi, FeishuApiError

    assert settings.feishu_app_id and settings.feishu_app_secret
    api = FeishuApi(
        app_id=settings.feishu_app_id,
        app_secret=settings.feishu_app_secret.get_secret_value(),
        domain=settings.feishu_domain,
        attempts=1,
    )
    await api.open()
    try:
        open_id = await api.bot_open_id()
    except CredentialsRejected as exc:
        return [Finding("feishu token", FAIL, f"no tenant token (code {exc.code})", "check FEISHU_APP_ID and FEISHU_APP_SECRET")]
    except FeishuApiError as exc:
        fix = "enable the bot feature and publish a version; check FEISHU_DOMAIN"
        return [Finding("feishu token", OK, "tenant token issued"), Finding("feishu bot info", FAIL, _short(str(exc)), fix)]
    found = [Finding("feishu token", OK, "tenant token issued"), Finding("feishu bot info", OK, f"the bot is {open_id}")]
    found.append(await _feishu_mode(settings))
    return found


async def _feishu_mode(settings: Settings) -> Finding:
    if settings.feishu_mode == "webhook":
        return Finding("feishu event mode", OK, "webhook: Feishu must reach POST /feishu/events")
    assert settings.feishu_app_secret is not None
    body = {"AppID": settings.feishu_app_id, "AppSecret": settings.feishu_app_secret.get_secret_value()}
    url = settings.feishu_domain.rstrip("/") + "/callback/ws/endpoint"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, http.post(url, json=body) as response:
        answer = await response.json(content_type=None)
    if answer.get("code") != 0:
        fix = "in the developer console, Events & Callbacks: choose the long connection for events and callbacks; publish"
        return Finding(
            "feishu event mode", FAIL, f"long connection refused (code {answer.get('code')}: {answer.get('msg')})", fix
        )
    return Finding("feishu event mode", OK, "long connection endpoint granted")


# ---------------------------------------------------------------------- e-mail, CRM, MCP
async def check_smtp(settings: Settings) -> list[Finding]:
    if not settings.smtp_host:
        return [Finding("smtp", SKIP, "not configured (SMTP_HOST): send_email is unavailable")]
    return [await asyncio.to_thread(_smtp_probe, settings)]


def _smtp_probe(settings: Settings) -> Finding:
    from tools.config import DEFAULT_SMTP_PORTS

    host, port = settings.smtp_host or "", settings.smtp_port or DEFAULT_SMTP_PORTS[settings.smtp_security]
    stage = "connect"
    try:
        if settings.smtp_security == "ssl":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=10, context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(host, port, timeout=10)
        try:
            stage = "EHLO"
            smtp.ehlo()
            if settings.smtp_security == "starttls":
                stage = "STARTTLS"
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if settings.smtp_username:
                stage = "login"
                password = settings.smtp_password.get_secret_value() if settings.smtp_password else ""
                smtp.login(settings.smtp_username, password)
        finally:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                smtp.close()
    except smtplib.SMTPAuthenticationError as exc:
        return Finding("smtp", FAIL, f"login refused ({exc.smtp_code})", "check SMTP_USERNAME and SMTP_PASSWORD")
    except smtplib.SMTPNotSupportedError:
        return Finding(
            "smtp", FAIL, f"{host}:{port} does not offer {stage}", "check SMTP_SECURITY (starttls, ssl, none) and SMTP_PORT"
        )
    except (OSError, smtplib.SMTPException) as exc:
        return Finding(
            "smtp", FAIL, f"{stage} failed at {host}:{port} ({type(exc).__name__})", "check SMTP_HOST, SMTP_PORT, SMTP_SECURITY"
        )
    if not settings.smtp_from:
        return Finding("smtp", FAIL, "the server answers but SMTP_FROM is not set", "set SMTP_FROM")
    login = " and login" if settings.smtp_username else ""
    return Finding("smtp", OK, f"{host}:{port} connect, {settings.smtp_security}{login} ok (no mail sent)")


async def check_hubspot(settings: Settings) -> list[Finding]:
    if settings.crm_backend != "hubspot":
        return [Finding("hubspot", SKIP, "CHATOPS_CRM=builtin (the CRM lives in the database)")]
    assert settings.hubspot_token is not None
    url = settings.hubspot_base_url.rstrip("/") + "/crm/v3/owners/?limit=1"
    headers = {"Authorization": f"Bearer {settings.hubspot_token.get_secret_value()}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.get(url, headers=headers) as response,
        ):
            status = response.status
    except aiohttp.ClientError as exc:
        return [Finding("hubspot", FAIL, f"unreachable ({type(exc).__name__})", "check HUBSPOT_BASE_URL and the network")]
    if status in (401, 403):
        return [
            Finding("hubspot", FAIL, f"the token was refused ({status})", "check HUBSPOT_TOKEN and the private app's CRM scopes")
        ]
    if status >= 300:
        return [Finding("hubspot", FAIL, f"HubSpot answered HTTP {status}", "check HUBSPOT_BASE_URL")]
    return [Finding("hubspot", OK, "the token reads the CRM")]


async def check_mcp(settings: Settings) -> list[Finding]:
    if settings.mcp_config is None:
        return [Finding("mcp", SKIP, "no CHATOPS_MCP_CONFIG")]
    from tools.mcp.manager import McpManager

    manager = McpManager.from_file(settings.mcp_config)
    try:
        specs = await manager.start()
    finally:
        await manager.close()
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.source.removeprefix("mcp:")] = counts.get(spec.source.removeprefix("mcp:"), 0) + 1
    found = [Finding(f"mcp {name}", OK, f"initialized, {n} tools listed") for name, n in sorted(counts.items())]
    fix = f"check the server's command/url in {settings.mcp_config} and run it by hand"
    found += [Finding(f"mcp {name}", FAIL, _short(problem), fix) for name, problem in sorted(manager.problems.items())]
    return found


CHECKS: list[Check] = [check_model, check_database, check_policy, check_slack, check_feishu, check_smtp, check_hubspot, check_mcp]


async def run_checks(settings: Settings) -> list[Finding]:
    """Every check, each bounded by CHECK_TIMEOUT; a check that breaks is a failed row, not a crash."""
    redactor = Redactor(settings.secret_values())

    async def one(check: Check) -> list[Finding]:
        name = check.__name__.removeprefix("check_")
        try:
            return await asyncio.wait_for(check(settings), CHECK_TIMEOUT)
        except TimeoutError:
            return [Finding(name, FAIL, f"no answer within {CHECK_TIMEOUT:.0f}s", "check the address and the network")]
        except Exception as exc:  # noqa: BLE001 - one row per broken check
            return [Finding(name, FAIL, f"the check failed ({type(exc).__name__}: {_short(redactor.redact_text(str(exc)))})")]

    results = await asyncio.gather(*(one(check) for check in CHECKS))
    return [finding for findings in results for finding in findings]


def render(findings: list[Finding]) -> str:
    """A plain-text table: check, status, detail, and the fix under each failed or warned row."""
    width = max(len(f.check) for f in findings)
    lines = [f"{'check'.ljust(width)}  status  detail"]
    for f in findings:
        lines.append(f"{f.check.ljust(width)}  {f.status.ljust(6)}  {f.detail}")
        if f.fix and f.status in (FAIL, WARN):
            lines.append(f"{''.ljust(width)}  {''.ljust(6)}  fix: {f.fix}")
    return "\n".join(lines)


def _short(text: str, limit: int = 200) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"
