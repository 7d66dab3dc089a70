"""A long answer as a CardKit streaming card: the reader sees it typed out instead of one wall of text.

Steps (Feishu's streaming-card flow): create a card entity in streaming mode with one markdown element,
reply with that card in the thread, push the text so far into the element (`sequence` rising; the
client types out what is new), then end streaming mode. The caller gets False when the card could not
be shown at all (CardKit refused, no scope): it then posts the answer plainly. A stream that breaks
after the card was posted gets the whole text in one last push (or, failing that, the card is
withdrawn and False returned), so the answer is never shown twice nor half.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from bot.feishu.client import FeishuApi, FeishuApiError

log = logging.getLogger("chatops.feishu")

STREAM_AFTER = 1500  # characters: a shorter answer simply replaces the progress line
CHUNK = 1000  # characters added per push
ELEMENT_ID = "answer"
_TAG_OPEN = re.compile(r"<(?=[A-Za-z/])")

Post = Callable[[str, str], Awaitable[str]]  # (msg_type, content) -> message id, in the run's thread


def inert(text: str) -> str:
    """Model text for a markdown element: no `<at>`, `<font>`, `<link>`... tag can take effect."""
    return _TAG_OPEN.sub("<\u200b", text)


def streaming_card(summary: str) -> dict[str, Any]:
    return {
        "schema": "2.0",
        "config": {"update_multi": True, "streaming_mode": True, "summary": {"content": summary[:100]}},
        "body": {"elements": [{"tag": "markdown", "element_id": ELEMENT_ID, "content": ""}]},
    }


def prefixes(text: str, size: int = CHUNK) -> list[str]:
    """The growing prefixes of `text` pushed one after another (the last one is the whole text)."""
    return [text[:end] for end in range(size, len(text), size)] + [text]


async def stream_answer(api: FeishuApi, post: Post, text: str) -> bool:
    """Stream `text` as a card in the thread; True when it was shown in full, False to post it plainly."""
    text = inert(text)
    try:
        card_id = await api.create_card(streaming_card(text.split("\n", 1)[0]))
        message_id = await post("interactive", json.dumps({"type": "card", "data": {"card_id": card_id}}))
    except FeishuApiError as exc:
        log.info("feishu: streaming card unavailable (code %s); posting the answer instead", exc.code)
        return False
    sequence = 0
    try:
        for part in prefixes(text):
            sequence += 1
            await api.stream_text(card_id, ELEMENT_ID, part, sequence)
        await api.card_settings(card_id, {"config": {"streaming_mode": False}}, sequence + 1)
        return True
    except FeishuApiError as exc:
        log.warning("feishu: the answer's stream broke (code %s); posting it instead", exc.code)
        try:
            await api.recall(message_id)
        except FeishuApiError:
            log.warning("feishu: could not withdraw the broken streaming card %s", message_id)
        return False
