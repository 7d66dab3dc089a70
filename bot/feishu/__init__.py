"""Feishu / Lark channel adapter (GitHub issue #4).

`FeishuAdapter(core, settings)` is the only public name. Its modules, one concern each:

- `adapter`  — the `Channel` and lifecycle (`routes`, `start`, `stop`), `dispatch` to the core
- `events`   — Feishu JSON -> `IncomingMessage` / `DecisionRequest` (mentions, threads, dedupe keys)
- `cards`    — `CardView` -> card JSON 2.0 (under 30 KB) and the card-callback answer
- `webhook`  — decryption, signature, token and timestamp checks for `POST /feishu/events`
- `longconn` — lark-oapi's websocket client in its own thread and event loop
- `client`   — lark-oapi `Client` calls with timeouts, token refresh and rate-limit backoff

lark-oapi is imported lazily (it takes seconds), and no lark type leaves this package.
"""

from bot.feishu.adapter import FeishuAdapter

__all__ = ["FeishuAdapter"]
