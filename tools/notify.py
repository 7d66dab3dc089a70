"""Notification tools: post a message to a Feishu group robot or to a Slack channel.

Posting is not idempotent (neither API takes an idempotency key), so nothing here retries:
a request refused before it was sent is `ToolUnavailable`; one that was sent but got no
answer is `ToolInDoubt`, and a human checks the channel. The Feishu robot webhook is signed
exactly as Feishu specifies (HMAC-SHA256 keyed with "timestamp\\nsecret" over an empty message).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Annotated, Any

import aiohttp
import httpx
from pydantic import Field
from slack_sdk.errors import SlackApiError

from tools.context import ToolContext
from tools.errors import ArgumentError, ToolError, ToolInDoubt, ToolUnavailable
from tools.registry import Toolset

__all__ = ["feishu_sign", "toolset"]

toolset = Toolset("notify")

HTTP_TIMEOUT = 10.0
SUMMARY_CHARS = 80
Message = Annotated[str, Field(min_length=1, max_length=4000)]
SLACK_HINTS = {
    "channel_not_found": "check the channel name or id",
    "not_in_channel": "invite the bot to the channel first",
    "is_archived": "the channel is archived",
    "ratelimited": "Slack is rate-limiting the bot; try again in a minute",
}


def feishu_sign(timestamp: int, secret: str) -> str:
    """Feishu's robot signature: base64(HMAC-SHA256(key=f"{timestamp}\\n{secret}", msg=b""))."""
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def _webhook_url(ctx: ToolContext) -> str:
    if not ctx.settings.feishu_webhook_url:
        raise ToolUnavailable("Feishu notifications are not configured: set FEISHU_WEBHOOK_URL (and FEISHU_WEBHOOK_SECRET).")
    return ctx.settings.feishu_webhook_url


async def _check_feishu(ctx: ToolContext, args: dict[str, Any]) -> None:
    _webhook_url(ctx)
    if not args["message"].strip():
        raise ArgumentError("The message is empty.")


@toolset.tool(read_only=False, check=_check_feishu, describe=lambda a: f"Post to the Feishu group: “{_short(a['message'])}”")
async def notify_feishu(ctx: ToolContext, message: Message) -> dict[str, Any]:
    """Post a text message to the team's Feishu (Lark) group through its robot.

    Args:
        message: The text to post.
    """
    url = _webhook_url(ctx)
    body: dict[str, Any] = {"msg_type": "text", "content": {"text": message}}
    secret = ctx.settings.feishu_webhook_secret
    if secret is not None:
        timestamp = int(time.time())
        body = {"timestamp": str(timestamp), "sign": feishu_sign(timestamp, secret.get_secret_value()), **body}
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            response = await client.post(url, json=body)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise ToolUnavailable(f"The Feishu webhook cannot be reached ({type(exc).__name__}); nothing was posted.") from None
    except httpx.HTTPError as exc:
        raise ToolInDoubt(f"Feishu did not answer ({type(exc).__name__}); the message may have been posted") from None
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    code = answer.get("code", answer.get("StatusCode")) if isinstance(answer, dict) else None
    if response.status_code >= 500 and code is None:
        raise ToolInDoubt(f"Feishu failed with HTTP {response.status_code}; the message may have been posted")
    if code != 0:
        detail = (answer.get("msg") or answer.get("StatusMessage")) if isinstance(answer, dict) else None
        detail = detail or response.text[:200]
        raise ToolError(f"Feishu refused the message (code {code}, HTTP {response.status_code}): {detail}")
    return {"result": "posted", "platform": "feishu"}


def _slack(ctx: ToolContext) -> Any:
    client = ctx.service("slack")
    if client is None:
        raise ToolUnavailable("Slack is not connected: set SLACK_BOT_TOKEN and run the Slack channel to post to Slack.")
    return client


async def _check_slack(ctx: ToolContext, args: dict[str, Any]) -> None:
    _slack(ctx)
    if not args["message"].strip():
        raise ArgumentError("The message is empty.")


def _describe_slack(args: dict[str, Any]) -> str:
    return f"Post to Slack {args['channel']}: “{_short(args['message'])}”"


@toolset.tool(read_only=False, check=_check_slack, describe=_describe_slack)
async def notify_slack(
    ctx: ToolContext,
    channel: Annotated[str, Field(min_length=1, max_length=200)],
    message: Message,
) -> dict[str, Any]:
    """Post a message to a Slack channel as the bot.

    Args:
        channel: The channel: a name like #ops or an id like C0123456.
        message: The text to post (Slack mrkdwn).
    """
    client = _slack(ctx)
    try:
        response = await client.chat_postMessage(channel=channel, text=message)
    except SlackApiError as exc:
        error = str(exc.response.get("error", "unknown_error"))
        hint = SLACK_HINTS.get(error)
        raise ToolError(f"Slack refused the message to {channel}: {error}" + (f" ({hint})" if hint else "")) from None
    except aiohttp.ClientConnectorError as exc:
        raise ToolUnavailable(f"Slack cannot be reached ({type(exc).__name__}); nothing was posted.") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ToolInDoubt(f"Slack did not answer ({type(exc).__name__}); the message may have been posted") from None
    return {"result": "posted", "platform": "slack", "channel": response.get("channel"), "ts": response.get("ts")}
