"""Services the app hands to tools, as protocols: tools depend on what a service does, not on an SDK.

A `SlackPoster` posts one message to a Slack channel. The app implements it with the Slack SDK
(`bot.slack.poster`); tools never import slack_sdk. Its failures come in two kinds a tool can
classify honestly: `SlackRefused` (Slack answered and did not post) and `DeliveryError`, which
says whether the request may have reached the other side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PostedMessage:
    channel: str | None
    ts: str | None


class SlackRefused(Exception):
    """Slack answered `ok: false`; `error` is Slack's error code (e.g. `channel_not_found`). Nothing was posted."""

    def __init__(self, error: str) -> None:
        self.error = error
        super().__init__(error)


class DeliveryError(Exception):
    """The request got no usable answer. `may_have_arrived` is False only when it cannot have been sent."""

    def __init__(self, reason: str, *, may_have_arrived: bool) -> None:
        self.reason = reason
        self.may_have_arrived = may_have_arrived
        super().__init__(reason)


class SlackPoster(Protocol):
    """Posts a message as the bot. Raises `SlackRefused` or `DeliveryError`; never retries a sent request."""

    async def post_message(self, channel: str, text: str) -> PostedMessage: ...
