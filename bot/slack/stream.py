"""A long answer through Slack's message streaming API (`chat.startStream` / `chat.appendStream` /
`chat.stopStream`, slack_sdk >= 3.37), so the reader sees it arrive instead of one wall of text.

Streaming is only tried in a thread (Slack streams replies) and is all-or-nothing for the caller:
`stream_answer` returns False when Slack refused the stream before anything was shown (an older
workspace, a missing scope, an error), and the adapter then posts the answer plainly. A stream that
fails after it started is stopped, its partial message removed, and False is returned too, so the
answer is never shown twice nor half.
"""

from __future__ import annotations

import logging

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.core.events import Thread
from bot.slack.api_error import error_code

log = logging.getLogger("chatops.slack")

STREAM_AFTER = 1500  # characters: a shorter answer simply replaces the progress message
CHUNK = 1000  # characters per chat.appendStream (Slack accepts up to 12,000)


def pieces(text: str, size: int = CHUNK) -> list[str]:
    """`text` in pieces of about `size`, cut after a line break or a space where possible."""
    parts: list[str] = []
    while len(text) > size:
        cut = max(text.rfind("\n", 0, size), text.rfind(" ", 0, size))
        cut = cut + 1 if cut > size // 2 else size
        parts.append(text[:cut])
        text = text[cut:]
    return [*parts, text] if text else parts


async def stream_answer(client: AsyncWebClient, thread: Thread, text: str) -> bool:
    """Stream `text` into the thread; True when it was shown in full, False to fall back to a post."""
    coords = thread.coords
    channel, thread_ts = str(coords["channel"]), str(coords["thread_ts"])
    recipient = {} if coords.get("dm") else {"recipient_user_id": coords.get("user"), "recipient_team_id": coords.get("team")}
    parts = pieces(text)
    try:
        started = await client.chat_startStream(channel=channel, thread_ts=thread_ts, markdown_text=parts[0], **recipient)
    except SlackApiError as exc:
        log.info("slack: streaming unavailable (%s); posting the answer instead", error_code(exc))
        return False
    ts = str(started.get("ts") or "")
    try:
        for part in parts[1:]:
            await client.chat_appendStream(channel=channel, ts=ts, markdown_text=part)
        await client.chat_stopStream(channel=channel, ts=ts)
        return True
    except SlackApiError as exc:
        log.warning("slack: the answer's stream broke (%s); posting it instead", error_code(exc))
        try:
            await client.chat_delete(channel=channel, ts=ts)
        except SlackApiError:
            log.warning("slack: could not remove the broken stream %s", ts)
        return False
