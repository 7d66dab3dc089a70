"""A fake Slack: the Web API over real HTTP on 127.0.0.1, plus a Socket Mode WebSocket.

The bot's real `AsyncWebClient` talks to it through SLACK_API_URL. Every call is recorded as an
`ApiCall` (method name, parsed parameters, token, HTTP status) and answered the way Slack does for
the methods the bot uses (`auth.test`, `chat.postMessage` returns a fresh `ts`, `chat.update`,
`chat.delete`, the streaming trio `chat.startStream` / `chat.appendStream` / `chat.stopStream` (a
streamed message grows in `messages`, `streaming` while open), `views.publish` (the latest home
view per user in `homes`), `chat.postEphemeral` (kept in `ephemerals`, each with a `response_url` that
replaces it, as Slack's does), `reactions.add`, `conversations.replies`, `views.open`, `users.info`,
`usergroups.users.list` (members set with `set_usergroup`), `apps.connections.open`...). A test can make a method answer 429 with Retry-After, or a Slack
error, a number of times. `wait_for` waits on calls instead of sleeping.

Socket Mode: `apps.connections.open` hands out `ws://127.0.0.1:<port>/socket`; `push` sends an
envelope to the connected client and `wait_ack` waits for the client's acknowledgement.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

TEAM_ID = "T0CHATOPS"
BOT_USER_ID = "U0BOT"
BOT_ID = "B0BOT"


@dataclass
class ApiCall:
    """One request the bot made."""

    method: str
    params: dict[str, Any]
    token: str | None
    status: int = 200
    at: float = field(default_factory=time.monotonic)


@dataclass
class FakeSlackApi:
    """Use as an async context manager; `url` is the value for SLACK_API_URL."""

    calls: list[ApiCall] = field(default_factory=list)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)
    usergroups: dict[str, list[str]] = field(default_factory=dict)
    homes: dict[str, dict[str, Any]] = field(default_factory=dict)
    ephemerals: dict[str, dict[str, Any]] = field(default_factory=dict)  # by message_ts, with their response_url
    # What a token installed from manifest.yml has; Slack sends it as `x-oauth-scopes` on every answer.
    scopes: list[str] = field(
        default_factory=lambda: [
            "app_mentions:read",
            "commands",
            "chat:write",
            "im:history",
            "reactions:write",
            "usergroups:read",
            "users:read",
        ]
    )
    port: int = 0
    _limits: dict[str, list[int]] = field(default_factory=dict)
    _errors: dict[str, list[Any]] = field(default_factory=dict)
    _server_errors: dict[str, list[int]] = field(default_factory=dict)
    _ts: Any = field(default_factory=lambda: itertools.count(1))
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _sockets: list[web.WebSocketResponse] = field(default_factory=list)
    _hang: set[str] = field(default_factory=set)
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    hung: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    # ------------------------------------------------------------------ scripting
    def rate_limit(self, method: str, times: int = 1, retry_after: int = 1) -> None:
        """The next `times` calls of `method` answer HTTP 429 with `Retry-After: retry_after`."""
        self._limits[method] = [times, retry_after]

    def fail(self, method: str, error: str, times: int = 1) -> None:
        """The next `times` calls of `method` answer `{"ok": false, "error": error}`."""
        self._errors[method] = [times, error]

    def server_error(self, method: str, times: int = 1, status: int = 500) -> None:
        """The next `times` calls of `method` answer HTTP `status` with a plain-text body, as a proxy or
        load balancer in front of Slack does (no JSON, no `ok`)."""
        self._server_errors[method] = [times, status]

    def hang(self, method: str) -> None:
        """The next call of `method` is read in full and never answered (`hung` is set then)."""
        self._hang.add(method)

    def add_user(
        self,
        user_id: str,
        name: str,
        *,
        is_bot: bool = False,
        team: str = TEAM_ID,
        locale: str | None = None,
        tz: str | None = None,
    ) -> None:
        self.users[user_id] = {
            "id": user_id,
            "team_id": team,
            "name": name.lower(),
            "real_name": name,
            "is_bot": is_bot,
            "profile": {"display_name": name, "real_name": name},
            **({"tz": tz} if tz else {}),
            **({"locale": locale} if locale else {}),
        }

    def set_usergroup(self, group_id: str, members: list[str]) -> None:
        """The user group `group_id` (S…) now has exactly these members (`usergroups.users.list`)."""
        self.usergroups[group_id] = list(members)

    # ------------------------------------------------------------------ inspection
    def calls_to(self, method: str, *, ok_only: bool = True) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method and (c.status == 200 or not ok_only)]

    async def wait_for(self, method: str, count: int = 1, timeout: float = 10.0) -> list[ApiCall]:
        """Wait until `method` was answered successfully at least `count` times."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.calls_to(method)) >= count)
        return self.calls_to(method)

    async def wait_until(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until `predicate()` holds, checked after every answered call."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    # ------------------------------------------------------------------ Web API
    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.can_read_body:
            params.update(dict(await request.post()))
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else params.pop("token", None)
        call = ApiCall(method, params, token)
        if method in self._hang:
            self._hang.discard(method)
            self.hung.set()
            await self._release.wait()
        response = self._answer(call)
        self.calls.append(call)
        async with self._changed:
            self._changed.notify_all()
        return response

    def _answer(self, call: ApiCall) -> web.Response:
        broken = self._server_errors.get(call.method)
        if broken and broken[0] > 0:
            broken[0] -= 1
            call.status = broken[1]
            return web.Response(status=broken[1], text="upstream connect error or disconnect/reset before headers")
        limit = self._limits.get(call.method)
        if limit and limit[0] > 0:
            limit[0] -= 1
            call.status = 429
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(limit[1])})
        expected = "xapp-" if call.method == "apps.connections.open" else "xoxb-"
        if not call.token or not call.token.startswith(expected):
            return web.json_response({"ok": False, "error": "not_authed" if not call.token else "invalid_auth"})
        error = self._errors.get(call.method)
        if error and error[0] > 0:
            error[0] -= 1
            return web.json_response({"ok": False, "error": error[1]})
        handler = getattr(self, "_m_" + call.method.replace(".", "_"), None)
        body = handler(call.params) if handler else {}
        headers = {"x-oauth-scopes": ",".join(self.scopes)} if expected == "xoxb-" else {}
        return web.json_response({"ok": True, **body}, headers=headers)  # a handler's own {"ok": False, ...} wins

    def _new_ts(self) -> str:
        return f"1700000000.{next(self._ts):06d}"

    def _m_auth_test(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": "https://fake.slack.test/",
            "team": "Fake",
            "user": "chatops",
            "team_id": TEAM_ID,
            "user_id": BOT_USER_ID,
            "bot_id": BOT_ID,
            "is_enterprise_install": False,
        }

    def _m_chat_postMessage(self, p: dict[str, Any]) -> dict[str, Any]:
        ts = self._new_ts()
        self.messages[ts] = {
            "channel": p.get("channel"),
            "text": p.get("text"),
            "blocks": p.get("blocks"),
            "thread_ts": p.get("thread_ts"),
            "ts": ts,
        }
        return {"channel": p.get("channel"), "ts": ts, "message": self.messages[ts]}

    def _m_chat_update(self, p: dict[str, Any]) -> dict[str, Any]:
        message = self.messages.get(str(p.get("ts")))
        if message is not None:
            message.update(text=p.get("text"), blocks=p.get("blocks"))
        return {"channel": p.get("channel"), "ts": p.get("ts"), "text": p.get("text")}

    def _m_chat_delete(self, p: dict[str, Any]) -> dict[str, Any]:
        if self.messages.pop(str(p.get("ts")), None) is None:
            return {"ok": False, "error": "message_not_found"}
        return {"channel": p.get("channel"), "ts": p.get("ts")}

    def _m_chat_startStream(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("thread_ts"):
            return {"ok": False, "error": "invalid_arguments"}
        if not str(p.get("channel", "")).startswith("D") and not p.get("recipient_user_id"):
            return {"ok": False, "error": "missing_recipient_user_id"}  # required when streaming to channels
        ts = self._new_ts()
        self.messages[ts] = {
            "channel": p.get("channel"),
            "text": p.get("markdown_text") or "",
            "blocks": None,
            "thread_ts": p.get("thread_ts"),
            "ts": ts,
            "streaming": True,
        }
        return {"channel": p.get("channel"), "ts": ts}

    def _m_chat_appendStream(self, p: dict[str, Any]) -> dict[str, Any]:
        message = self.messages.get(str(p.get("ts")))
        if message is None or not message.get("streaming"):
            return {"ok": False, "error": "message_not_in_streaming_state"}
        message["text"] += p.get("markdown_text") or ""
        return {"channel": p.get("channel"), "ts": p.get("ts")}

    def _m_chat_stopStream(self, p: dict[str, Any]) -> dict[str, Any]:
        message = self.messages.get(str(p.get("ts")))
        if message is None or not message.get("streaming"):
            return {"ok": False, "error": "message_not_in_streaming_state"}
        message["text"] += p.get("markdown_text") or ""
        message["streaming"] = False
        return {"channel": p.get("channel"), "ts": p.get("ts"), "message": message}

    def _m_views_publish(self, p: dict[str, Any]) -> dict[str, Any]:
        view = p.get("view")
        view = json.loads(view) if isinstance(view, str) else view
        if not isinstance(view, dict) or view.get("type") != "home":
            return {"ok": False, "error": "invalid_arguments"}
        if len(view.get("blocks") or []) > 100:
            return {"ok": False, "error": "invalid_blocks"}
        self.homes[str(p.get("user_id"))] = view
        return {"view": {"id": "V" + uuid.uuid4().hex[:10].upper(), **view}}

    def _m_chat_postEphemeral(self, p: dict[str, Any]) -> dict[str, Any]:
        ts = self._new_ts()
        response_url = f"http://127.0.0.1:{self.port}/respond/{ts}"
        blocks = p.get("blocks")
        blocks = json.loads(blocks) if isinstance(blocks, str) else blocks
        self.ephemerals[ts] = {**p, "ts": ts, "blocks": blocks, "response_url": response_url, "replaced": 0}
        return {"message_ts": ts}

    async def _respond(self, request: web.Request) -> web.Response:
        """A `response_url`: `replace_original` replaces the ephemeral message it belongs to."""
        body = await request.json()
        message = self.ephemerals.get(request.match_info["ts"])
        if message is None:
            return web.Response(status=404, text="expired_url")
        if body.get("replace_original"):
            message.update(text=body.get("text"), blocks=body.get("blocks"), replaced=message["replaced"] + 1)
        async with self._changed:
            self._changed.notify_all()
        return web.Response(text="ok")

    def _m_conversations_replies(self, p: dict[str, Any]) -> dict[str, Any]:
        root = str(p.get("ts"))
        thread = [m for m in self.messages.values() if root in (m["ts"], m.get("thread_ts"))]
        return {"messages": thread, "has_more": False}

    def _m_views_open(self, p: dict[str, Any]) -> dict[str, Any]:
        view = p.get("view")
        view = json.loads(view) if isinstance(view, str) else view
        return {"view": {"id": "V" + uuid.uuid4().hex[:10].upper(), **(view or {})}}

    def _m_users_info(self, p: dict[str, Any]) -> dict[str, Any]:
        user_id = str(p.get("user"))
        default = {"id": user_id, "team_id": TEAM_ID, "name": user_id.lower(), "is_bot": False, "profile": {}}
        user = dict(self.users.get(user_id, default))
        if str(p.get("include_locale")).lower() not in ("true", "1"):
            user.pop("locale", None)  # Slack sends the locale only when asked
        return {"user": user}

    def _m_usergroups_users_list(self, p: dict[str, Any]) -> dict[str, Any]:
        members = self.usergroups.get(str(p.get("usergroup")))
        if members is None:
            return {"ok": False, "error": "no_such_subteam"}
        return {"users": list(members)}

    def _m_apps_connections_open(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"url": f"ws://127.0.0.1:{self.port}/socket"}

    # ------------------------------------------------------------------ Socket Mode
    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_json({"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A0CHATOPS"}})
        async with self._changed:
            self._changed.notify_all()
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                data = json.loads(message.data)
                if "envelope_id" in data:
                    self.acks[data["envelope_id"]] = data
                    async with self._changed:
                        self._changed.notify_all()
        self._sockets.remove(ws)
        return ws

    async def wait_connected(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: bool(self._sockets))

    async def push(self, kind: str, payload: dict[str, Any], *, retry_attempt: int = 0, retry_reason: str = "") -> str:
        """Send an envelope (`events_api`, `interactive`) to the connected client; returns its id."""
        envelope_id = str(uuid.uuid4())
        envelope = {
            "envelope_id": envelope_id,
            "type": kind,
            "payload": payload,
            "accepts_response_payload": kind == "interactive",
            "retry_attempt": retry_attempt,
            "retry_reason": retry_reason,
        }
        await self._sockets[-1].send_json(envelope)
        return envelope_id

    async def wait_ack(self, envelope_id: str, timeout: float = 10.0) -> dict[str, Any] | None:
        """The client's acknowledgement of an envelope, or None if none came within `timeout`."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: envelope_id in self.acks)
        except TimeoutError:
            return None
        return self.acks[envelope_id]

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> FakeSlackApi:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/socket", self._socket)
        app.router.add_post("/respond/{ts}", self._respond)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
