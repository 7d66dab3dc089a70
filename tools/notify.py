"""Notification tools: post a message to a Feishu group robot or to a Slack channel.

Posting is not idempotent (neither API takes an idempotency key), so nothing here retries:
a request that failed before it was sent (connect) is "not sent" (`ToolUnavailable`); one that
was sent but got no answer (reset, read timeout) is `ToolInDoubt`, and a human checks the channel.
The Feishu robot is called over aiohttp (`tools.http`); Slack through the app's `SlackPoster`. The Feishu robot webhook is signed
exactly as Feishu specifies (HMAC-SHA256 keyed with "timestamp\\nsecret" over an empty message).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from typing import Annotated, Any

import aiohttp
from pydantic import Field

from tools import http
from tools.config import FeishuRobotConfig
from tools.context import ToolContext
from tools.errors import ArgumentError, ToolError, ToolInDoubt, ToolUnavailable
from tools.phrases import Sentence
from tools.registry import Toolset
from tools.services import DeliveryError, SlackPoster, SlackRefused

__all__ = ["feishu_sign", "toolset"]

toolset = Toolset("notify")

SUMMARY_CHARS = 80

# What the cards say (English; the app's catalogues translate them)
FEISHU_POST = Sentence("notify.FEISHU_POST", "Post to the Feishu group: “{message}”")
SLACK_POST = Sentence("notify.SLACK_POST", "Post to Slack {channel}: “{message}”")
SLACK_NOTIFIES_CHANNEL = Sentence("notify.SLACK_NOTIFIES_CHANNEL", "Slack will notify everyone in the channel (@channel)")
SLACK_NOTIFIES_HERE = Sentence("notify.SLACK_NOTIFIES_HERE", "Slack will notify everyone active in the channel (@here)")
SLACK_NOTIFIES_EVERYONE = Sentence("notify.SLACK_NOTIFIES_EVERYONE", "Slack will notify everyone in the workspace (@everyone)")
SLACK_NOTIFIES_GROUP = Sentence("notify.SLACK_NOTIFIES_GROUP", "Slack will notify the user group {group}")
SLACK_MENTIONS = Sentence("notify.SLACK_MENTIONS", "Slack will mention {target}")
SLACK_LINK = Sentence("notify.SLACK_LINK", "Slack will show the link text “{label}”, which opens {target}")
# What a post did or why it failed (the model reads the English; a decided card shows them translated)
FEISHU_POSTED = Sentence("notify.FEISHU_POSTED", "Posted to the Feishu group.")
SLACK_POSTED = Sentence("notify.SLACK_POSTED", "Posted to Slack {channel}.")
FEISHU_UNCONFIGURED = Sentence(
    "notify.FEISHU_UNCONFIGURED", "Feishu notifications are not configured: set FEISHU_WEBHOOK_URL (and FEISHU_WEBHOOK_SECRET)."
)
FEISHU_UNREACHABLE = Sentence("notify.FEISHU_UNREACHABLE", "not sent: the Feishu webhook cannot be reached ({reason})")
FEISHU_NO_ANSWER = Sentence("notify.FEISHU_NO_ANSWER", "Feishu did not answer ({reason}); the message may have been posted")
FEISHU_FAILED = Sentence("notify.FEISHU_FAILED", "Feishu failed with HTTP {status}; the message may have been posted")
FEISHU_REFUSED = Sentence("notify.FEISHU_REFUSED", "Feishu refused the message (code {code}, HTTP {status}): {detail}")
SLACK_UNCONFIGURED = Sentence(
    "notify.SLACK_UNCONFIGURED", "Slack is not connected: set SLACK_BOT_TOKEN and run the Slack channel to post to Slack."
)
SLACK_REFUSED = Sentence("notify.SLACK_REFUSED", "Slack refused the message to {channel}: {error}")
SLACK_REFUSED_HINT = Sentence("notify.SLACK_REFUSED_HINT", "Slack refused the message to {channel}: {error} ({hint})")
SLACK_UNREACHABLE = Sentence("notify.SLACK_UNREACHABLE", "not sent: Slack cannot be reached ({reason})")
SLACK_NO_ANSWER = Sentence("notify.SLACK_NO_ANSWER", "Slack did not answer ({reason}); the message may have been posted")
Message = Annotated[str, Field(min_length=1, max_length=4000)]
SLACK_HINTS = {
    "channel_not_found": Sentence("notify.HINT_CHANNEL_NOT_FOUND", "check the channel name or id"),
    "not_in_channel": Sentence("notify.HINT_NOT_IN_CHANNEL", "invite the bot to the channel first"),
    "is_archived": Sentence("notify.HINT_ARCHIVED", "the channel is archived"),
    "ratelimited": Sentence("notify.HINT_RATELIMITED", "Slack is rate-limiting the bot; try again in a minute"),
}


def feishu_sign(timestamp: int, secret: str) -> str:
    """Feishu's robot signature: base64(HMAC-SHA256(key=f"{timestamp}\\n{secret}", msg=b""))."""
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def _robot(ctx: ToolContext) -> FeishuRobotConfig:
    if ctx.feishu_robot is None:
        raise ToolUnavailable(FEISHU_UNCONFIGURED())
    return ctx.feishu_robot


async def _check_feishu(ctx: ToolContext, args: dict[str, Any]) -> None:
    _robot(ctx)
    if not args["message"].strip():
        raise ArgumentError("The message is empty.")


def _describe_feishu(args: dict[str, Any]) -> str:
    return FEISHU_POST(message=_short(args["message"]))


@toolset.tool(read_only=False, check=_check_feishu, describe=_describe_feishu)
async def notify_feishu(ctx: ToolContext, message: Message) -> dict[str, Any]:
    """Post a text message to the team's Feishu (Lark) group through its robot.

    Args:
        message: The text to post.
    """
    robot = _robot(ctx)
    body: dict[str, Any] = {"msg_type": "text", "content": {"text": message}}
    if robot.secret is not None:
        timestamp = int(time.time())
        body = {"timestamp": str(timestamp), "sign": feishu_sign(timestamp, robot.secret), **body}
    try:
        async with http.session(robot.timeouts) as session, session.post(robot.url, json=body) as response:
            status, text = response.status, await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        if http.never_sent(exc):
            raise ToolUnavailable(FEISHU_UNREACHABLE(reason=http.describe(exc))) from None
        raise ToolInDoubt(FEISHU_NO_ANSWER(reason=http.describe(exc))) from None
    return _feishu_outcome(status, text)


def _feishu_outcome(status: int, text: str) -> dict[str, Any]:
    try:
        answer = json.loads(text)
    except ValueError:
        answer = {}
    code = answer.get("code", answer.get("StatusCode")) if isinstance(answer, dict) else None
    if status >= 500 and code is None:
        raise ToolInDoubt(FEISHU_FAILED(status=status))
    if code != 0:
        detail = (answer.get("msg") or answer.get("StatusMessage")) if isinstance(answer, dict) else None
        detail = detail or text[:200]
        raise ToolError(FEISHU_REFUSED(code=code, status=status, detail=detail))
    return {"result": "posted", "platform": "feishu", "message": FEISHU_POSTED()}


def _slack(ctx: ToolContext) -> SlackPoster:
    if ctx.slack is None:
        raise ToolUnavailable(SLACK_UNCONFIGURED())
    return ctx.slack


async def _check_slack(ctx: ToolContext, args: dict[str, Any]) -> None:
    _slack(ctx)
    if not args["message"].strip():
        raise ArgumentError("The message is empty.")


def _describe_slack(args: dict[str, Any]) -> str:
    return SLACK_POST(channel=args["channel"], message=_short(args["message"]))


_SLACK_MARKUP = re.compile(r"<([^<>|]+)(?:\|([^<>]*))?>")
_BROADCASTS = {"!channel": SLACK_NOTIFIES_CHANNEL, "!here": SLACK_NOTIFIES_HERE, "!everyone": SLACK_NOTIFIES_EVERYONE}


async def _slack_rendering(ctx: ToolContext, args: dict[str, Any]) -> list[str]:
    """What Slack will make of the message's markup, which the card shows as typed: where each link
    really goes (its text may name another address), and who gets notified."""
    lines: list[str] = []
    for match in _SLACK_MARKUP.finditer(args["message"]):
        target, label = match.group(1).strip(), match.group(2)
        if target in _BROADCASTS:
            lines.append(_BROADCASTS[target]())
        elif target.startswith("!subteam^"):
            lines.append(SLACK_NOTIFIES_GROUP(group=target.removeprefix("!subteam^")))
        elif target.startswith(("@", "#")):
            lines.append(SLACK_MENTIONS(target=target))
        elif label is not None and label.strip() != target:
            lines.append(SLACK_LINK(label=label, target=target))
    return lines


@toolset.tool(read_only=False, check=_check_slack, describe=_describe_slack, preview=_slack_rendering)
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
    poster = _slack(ctx)
    try:
        posted = await poster.post_message(channel, message)
    except SlackRefused as exc:
        hint = SLACK_HINTS.get(exc.error)
        refused = (
            SLACK_REFUSED_HINT(channel=channel, error=exc.error, hint=hint())
            if hint
            else SLACK_REFUSED(channel=channel, error=exc.error)
        )
        raise ToolError(refused) from None
    except DeliveryError as exc:
        if not exc.may_have_arrived:
            raise ToolUnavailable(SLACK_UNREACHABLE(reason=exc.reason)) from None
        raise ToolInDoubt(SLACK_NO_ANSWER(reason=exc.reason)) from None
    message = SLACK_POSTED(channel=channel)
    return {"result": "posted", "platform": "slack", "channel": posted.channel, "ts": posted.ts, "message": message}
