"""The `error` of a Slack Web API failure, also when the answer was no JSON at all (a 5xx page from a
proxy or load balancer in front of Slack: slack_sdk then keeps the body as a str)."""

from __future__ import annotations

from slack_sdk.errors import SlackApiError


def error_code(exc: SlackApiError, default: str = "unknown_error") -> str:
    """Slack's error code (`ratelimited`, `channel_not_found`...), else `HTTP <status>`."""
    data = exc.response.data
    if isinstance(data, dict):
        return str(data.get("error", default))
    return f"HTTP {exc.response.status_code}"
