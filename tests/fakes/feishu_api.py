"""A fake Feishu Open API: a real aiohttp server on 127.0.0.1:0 the real lark-oapi client talks to.

Point `lark.Client` (FEISHU_DOMAIN) at `fake.url`. It serves the tenant token, bot info, message
create / reply / PATCH (cards) / PUT (text edits) / DELETE (recall) and reactions, CardKit card
entities (create, streaming text with a rising `sequence`, settings; `card_entities`, failures
injected with `fail_next[kind] = n`), a user's departments (`set_departments`) and a group chat's
members, paged (`set_chat_members`), honours `uuid` idempotency keys, keeps every message
(so tests can read a card after it was patched) and records each call. `fail_token_once()`
makes the next API call answer 99991663 (the token is rotated), `rate_limit_once()` answers
429/99991400 once. Cards over 30 KB or over 200 elements are refused (230099) as Feishu refuses them.
It also speaks the long-connection protocol: `/callback/ws/endpoint` plus a
websocket carrying pbbp2 frames, and `push()` sends an event frame and returns the ack.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from lark_oapi.ws.pb.pbbp2_pb2 import Frame

BOT_OPEN_ID = "ou_bot_chatops"
CARD_LIMIT = 30 * 1024
ELEMENT_LIMIT = 200  # card JSON 2.0: at most 200 components or elements per card, text elements (`plain_text`) included


def element_count(node: Any) -> int:
    """Every tagged object in a card (components and their text elements), as Feishu counts toward its 200."""
    if isinstance(node, dict):
        return ("tag" in node) + sum(element_count(v) for v in node.values())
    if isinstance(node, list):
        return sum(element_count(v) for v in node)
    return 0


def _too_many_elements(content: str) -> bool:
    try:
        return element_count(json.loads(content or "{}")) > ELEMENT_LIMIT
    except ValueError:
        return False


@dataclass
class Call:
    """One API request as the fake saw it."""

    method: str
    path: str
    query: dict[str, str]
    body: dict[str, Any]
    token: str | None


@dataclass
class Message:
    """A message the bot sent, as Feishu would store it."""

    message_id: str
    chat_id: str | None
    msg_type: str
    content: str
    reply_to: str | None = None
    in_thread: bool = False
    patches: list[str] = field(default_factory=list)

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.content)


class FakeFeishu:
    """Start with `await fake.start()`; stop with `await fake.stop()`."""

    def __init__(self, *, bot_open_id: str = BOT_OPEN_ID, app_secret: str | None = None) -> None:
        self.bot_open_id = bot_open_id
        self.app_secret = app_secret  # when set, only this secret gets a tenant token
        self.calls: list[Call] = []
        self.messages: dict[str, Message] = {}
        self.reactions: list[tuple[str, str]] = []
        self.users_messages: dict[str, Message] = {}
        self.recalled: set[str] = set()
        self.acks: list[dict[str, Any]] = []
        self.departments: dict[str, list[str]] = {}  # open_id -> open_department_ids
        self.chat_members: dict[str, list[str]] = {}  # chat_id -> member open_ids
        self.card_entities: dict[str, dict[str, Any]] = {}  # CardKit: card_id -> {"card", "text", "sequence", "streaming"}
        self.fail_next: dict[str, int] = {}  # call kind -> how many of its next calls answer an error
        self.user_lookups: asyncio.Event | None = None  # when set: `contact/v3/users` answers only once it is set
        self._ids = itertools.count(1)
        self._token = "t-1"
        self._tokens = itertools.count(2)
        self._by_uuid: dict[str, str] = {}
        self._fail_token = 0
        self._rate_limit = 0
        self._rate_limit_reset = "0"
        self._changed = asyncio.Condition()
        self._stalls: list[float] = []
        self._ws: web.WebSocketResponse | None = None
        self._ws_ready = asyncio.Event()
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> FakeFeishu:
        app = web.Application()
        app.router.add_post("/open-apis/auth/v3/tenant_access_token/internal", self._token_endpoint)
        app.router.add_get("/open-apis/bot/v3/info", self._bot_info)
        app.router.add_post("/open-apis/im/v1/messages", self._create)
        app.router.add_post("/open-apis/im/v1/messages/{mid}/reply", self._reply)
        app.router.add_patch("/open-apis/im/v1/messages/{mid}", self._patch)
        app.router.add_put("/open-apis/im/v1/messages/{mid}", self._edit)
        app.router.add_delete("/open-apis/im/v1/messages/{mid}", self._recall)
        app.router.add_post("/open-apis/cardkit/v1/cards", self._card_create)
        app.router.add_put("/open-apis/cardkit/v1/cards/{card_id}/elements/{element_id}/content", self._card_stream)
        app.router.add_patch("/open-apis/cardkit/v1/cards/{card_id}/settings", self._card_settings)
        app.router.add_post("/open-apis/im/v1/messages/{mid}/reactions", self._react)
        app.router.add_get("/open-apis/contact/v3/users/{uid}", self._user)
        app.router.add_get("/open-apis/im/v1/chats/{chat_id}/members", self._members)
        app.router.add_post("/callback/ws/endpoint", self._ws_endpoint)
        app.router.add_get("/ws", self._ws_handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ test controls
    def fail_token_once(self) -> None:
        self._fail_token += 1

    def rate_limit_once(self) -> None:
        self._rate_limit += 1

    def rate_limit(self, times: int, reset: int = 0) -> None:
        """The next `times` API calls answer HTTP 429, code 99991400, `x-ogw-ratelimit-reset: reset`."""
        self._rate_limit += times
        self._rate_limit_reset = str(reset)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Wait until `predicate()` holds after some API call was answered (TimeoutError otherwise)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    def stall_once(self, seconds: float) -> None:
        """The next API call is handled (and stored), but answered only after `seconds`."""
        self._stalls.append(seconds)

    def set_departments(self, open_id: str, department_ids: list[str]) -> None:
        """The user's direct departments, as `contact/v3/users/:id` reports them (unknown users: 41050)."""
        self.departments[open_id] = list(department_ids)

    def set_chat_members(self, chat_id: str, open_ids: list[str]) -> None:
        """The chat's members, as `im/v1/chats/:id/members` lists them (unknown chats: the bot is not in them)."""
        self.chat_members[chat_id] = list(open_ids)

    def user_message(self, message_id: str, chat_id: str, root_id: str | None = None) -> None:
        """Tell the fake about a message a user sent (so replies to it land in its chat)."""
        self.users_messages[message_id] = Message(message_id, chat_id, "user", "{}", reply_to=root_id)

    def recall(self, message_id: str) -> None:
        """The user withdrew this message: replies to it fail (230011)."""
        self.recalled.add(message_id)

    def calls_to(self, kind: str) -> list[Call]:
        """Calls by kind: token, bot_info, create, reply, patch, edit, recall, reaction, user, chat_members,
        card_create, card_stream, card_settings."""
        return [c for c in self.calls if _kind(c) == kind]

    def sent(self) -> list[Message]:
        return list(self.messages.values())

    def cards(self) -> list[Message]:
        return [m for m in self.messages.values() if m.msg_type == "interactive"]

    def texts(self) -> list[str]:
        return [m.json["text"] for m in self.messages.values() if m.msg_type == "text"]

    # ------------------------------------------------------------------ API handlers
    async def _record(self, request: web.Request) -> tuple[Call, web.Response | None]:
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        auth = request.headers.get("Authorization", "")
        call = Call(request.method, request.path, dict(request.query), body, auth.removeprefix("Bearer ") or None)
        self.calls.append(call)
        if _kind(call) == "token":
            return call, None
        if self._rate_limit:
            self._rate_limit -= 1
            problem = {"code": 99991400, "msg": "request trigger frequency limit"}
            return call, web.json_response(problem, status=429, headers={"x-ogw-ratelimit-reset": self._rate_limit_reset})
        if self._fail_token:
            self._fail_token -= 1
            self._token = f"t-{next(self._tokens)}"
        if call.token != self._token:
            problem = {"code": 99991663, "msg": "Invalid access token for authorization."}
            return call, web.json_response(problem, status=400)
        return call, None

    async def _done(self, response: web.Response) -> web.Response:
        if self._stalls and response.status == 200:
            await asyncio.sleep(self._stalls.pop(0))
        async with self._changed:
            self._changed.notify_all()
        return response

    async def _token_endpoint(self, request: web.Request) -> web.Response:
        call, _ = await self._record(request)
        if self.app_secret is not None and call.body.get("app_secret") != self.app_secret:
            return await self._done(web.json_response({"code": 10014, "msg": "app secret invalid"}))
        return await self._done(web.json_response({"code": 0, "msg": "ok", "tenant_access_token": self._token, "expire": 7200}))

    async def _bot_info(self, request: web.Request) -> web.Response:
        _, problem = await self._record(request)
        bot = {"activate_status": 2, "app_name": "chatops", "open_id": self.bot_open_id}
        return await self._done(problem or web.json_response({"code": 0, "msg": "ok", "bot": bot}))

    def _store(self, body: dict[str, Any], *, chat_id: str | None, reply_to: str | None) -> web.Response:
        if body.get("msg_type") == "interactive":
            size = len(body.get("content", "").encode())
            card = json.loads(body.get("content") or "{}")
            entity = (card.get("data") or {}).get("card_id") if card.get("type") == "card" else None
            if entity is not None and entity not in self.card_entities:
                return web.json_response({"code": 230099, "msg": "card_id is invalid"}, status=400)
            if size > CARD_LIMIT or (entity is None and card.get("schema") != "2.0"):
                return web.json_response({"code": 230099, "msg": "card content is invalid"}, status=400)
            if _too_many_elements(body.get("content", "")):
                msg = "Failed to create card content, ext=ErrCode: 11310; ErrMsg: element exceeds the limit"
                return web.json_response({"code": 230099, "msg": msg}, status=400)
        key = body.get("uuid")
        if key and key in self._by_uuid:
            return web.json_response({"code": 0, "msg": "ok", "data": {"message_id": self._by_uuid[key]}})
        target = self.messages.get(reply_to or "") or self.users_messages.get(reply_to or "")
        if target is not None:
            chat_id = target.chat_id
        message = Message(
            message_id=f"om_fake_{next(self._ids)}",
            chat_id=chat_id,
            msg_type=body.get("msg_type", ""),
            content=body.get("content", ""),
            reply_to=reply_to,
            in_thread=bool(body.get("reply_in_thread")),
        )
        self.messages[message.message_id] = message
        if key:
            self._by_uuid[key] = message.message_id
        return web.json_response({"code": 0, "msg": "ok", "data": {"message_id": message.message_id}})

    async def _create(self, request: web.Request) -> web.Response:
        call, problem = await self._record(request)
        if problem is not None:
            return await self._done(problem)
        return await self._done(self._store(call.body, chat_id=call.body.get("receive_id"), reply_to=None))

    async def _reply(self, request: web.Request) -> web.Response:
        call, problem = await self._record(request)
        if problem is not None:
            return await self._done(problem)
        if request.match_info["mid"] in self.recalled:
            return await self._done(web.json_response({"code": 230011, "msg": "The message was withdrawn."}, status=400))
        return await self._done(self._store(call.body, chat_id=None, reply_to=request.match_info["mid"]))

    async def _patch(self, request: web.Request) -> web.Response:
        call, problem = await self._record(request)
        message = self.messages.get(request.match_info["mid"])
        if problem is None and (message is None or message.msg_type != "interactive"):
            problem = web.json_response({"code": 230001, "msg": "invalid message_id"}, status=400)
        if problem is None and len(call.body.get("content", "").encode()) > CARD_LIMIT:
            problem = web.json_response({"code": 230099, "msg": "card too large"}, status=400)
        if problem is None and _too_many_elements(call.body.get("content", "")):
            problem = web.json_response({"code": 230099, "msg": "ErrCode: 11310; ErrMsg: element exceeds the limit"}, status=400)
        if problem is not None:
            return await self._done(problem)
        assert message is not None
        message.patches.append(call.body["content"])
        message.content = call.body["content"]
        return await self._done(web.json_response({"code": 0, "msg": "ok", "data": {}}))

    async def _edit(self, request: web.Request) -> web.Response:
        """`PUT /im/v1/messages/:id`: edit a text or post message the bot sent (cards need PATCH)."""
        call, problem = await self._record(request)
        message = self.messages.get(request.match_info["mid"])
        if problem is None and (message is None or message.msg_type not in ("text", "post")):
            problem = web.json_response({"code": 230001, "msg": "this message type cannot be edited"}, status=400)
        if problem is not None:
            return await self._done(problem)
        assert message is not None
        message.patches.append(call.body["content"])
        message.content = call.body["content"]
        return await self._done(web.json_response({"code": 0, "msg": "ok", "data": {"message_id": message.message_id}}))

    def _injected(self, kind: str) -> web.Response | None:
        if self.fail_next.get(kind, 0) > 0:
            self.fail_next[kind] -= 1
            return web.json_response({"code": 300099, "msg": f"injected {kind} failure"}, status=400)
        return None

    async def _recall(self, request: web.Request) -> web.Response:
        """`DELETE /im/v1/messages/:id`: the bot withdraws its own message."""
        _, problem = await self._record(request)
        if problem is None and self.messages.pop(request.match_info["mid"], None) is None:
            problem = web.json_response({"code": 230011, "msg": "the message was withdrawn or does not exist"}, status=400)
        return await self._done(problem or web.json_response({"code": 0, "msg": "ok", "data": {}}))

    async def _card_create(self, request: web.Request) -> web.Response:
        """`POST /cardkit/v1/cards` with `type: card_json`: a card entity (JSON 2.0 only)."""
        call, problem = await self._record(request)
        problem = problem or self._injected("card_create")
        card = json.loads(call.body.get("data") or "{}") if problem is None else {}
        if problem is None and (call.body.get("type") != "card_json" or card.get("schema") != "2.0"):
            problem = web.json_response({"code": 200621, "msg": "card json is invalid"}, status=400)
        if problem is not None:
            return await self._done(problem)
        card_id = f"7{next(self._ids):018d}"
        streaming = bool((card.get("config") or {}).get("streaming_mode"))
        self.card_entities[card_id] = {"card": card, "text": "", "sequence": 0, "streaming": streaming}
        return await self._done(web.json_response({"code": 0, "msg": "ok", "data": {"card_id": card_id}}))

    def _entity_problem(self, card_id: str, sequence: Any) -> web.Response | None:
        entity = self.card_entities.get(card_id)
        if entity is None:
            return web.json_response({"code": 300301, "msg": "card not found"}, status=400)
        if not isinstance(sequence, int) or sequence <= entity["sequence"]:
            return web.json_response({"code": 300317, "msg": "sequence must increase"}, status=400)
        return None

    async def _card_stream(self, request: web.Request) -> web.Response:
        """`PUT .../elements/:element_id/content`: the element's full text so far (streaming mode only)."""
        call, problem = await self._record(request)
        card_id = request.match_info["card_id"]
        problem = problem or self._injected("card_stream") or self._entity_problem(card_id, call.body.get("sequence"))
        if problem is None and not self.card_entities[card_id]["streaming"]:
            problem = web.json_response({"code": 300309, "msg": "streaming mode is closed"}, status=400)
        if problem is not None:
            return await self._done(problem)
        entity = self.card_entities[card_id]
        entity["text"], entity["sequence"] = call.body["content"], call.body["sequence"]
        return await self._done(web.json_response({"code": 0, "msg": "ok", "data": {}}))

    async def _card_settings(self, request: web.Request) -> web.Response:
        """`PATCH .../settings`: the card's `config` (e.g. `streaming_mode: false`)."""
        call, problem = await self._record(request)
        card_id = request.match_info["card_id"]
        problem = problem or self._entity_problem(card_id, call.body.get("sequence"))
        if problem is not None:
            return await self._done(problem)
        entity = self.card_entities[card_id]
        config = json.loads(call.body.get("settings") or "{}").get("config") or {}
        entity["streaming"] = bool(config.get("streaming_mode", entity["streaming"]))
        entity["sequence"] = call.body["sequence"]
        return await self._done(web.json_response({"code": 0, "msg": "ok", "data": {}}))

    async def _react(self, request: web.Request) -> web.Response:
        call, problem = await self._record(request)
        if problem is not None:
            return await self._done(problem)
        self.reactions.append((request.match_info["mid"], call.body["reaction_type"]["emoji_type"]))
        data = {"reaction_id": f"r{len(self.reactions)}"}
        return await self._done(web.json_response({"code": 0, "msg": "ok", "data": data}))

    async def _user(self, request: web.Request) -> web.Response:
        if self.user_lookups is not None:
            await self.user_lookups.wait()
        call, problem = await self._record(request)
        if problem is not None:
            return await self._done(problem)
        open_id = request.match_info["uid"]
        if call.query.get("user_id_type") != "open_id" or open_id not in self.departments:
            return await self._done(web.json_response({"code": 41050, "msg": "no user authority error"}, status=400))
        user = {"open_id": open_id, "name": open_id, "department_ids": self.departments[open_id]}
        return await self._done(web.json_response({"code": 0, "msg": "success", "data": {"user": user}}))

    async def _members(self, request: web.Request) -> web.Response:
        call, problem = await self._record(request)
        if problem is not None:
            return await self._done(problem)
        members = self.chat_members.get(request.match_info["chat_id"])
        if members is None:
            return await self._done(
                web.json_response({"code": 232011, "msg": "Operator can NOT be out of the chat."}, status=400)
            )
        size = int(call.query.get("page_size") or 20)
        start = int(call.query.get("page_token") or 0)
        page = members[start : start + size]
        more = start + size < len(members)
        items = [{"member_id_type": "open_id", "member_id": m, "name": m, "tenant_key": "tenant-1"} for m in page]
        data = {"items": items, "page_token": str(start + size) if more else "", "has_more": more, "member_total": len(members)}
        return await self._done(web.json_response({"code": 0, "msg": "success", "data": data}))

    # ------------------------------------------------------------------ long connection
    async def _ws_endpoint(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("AppSecret") in (None, ""):
            return web.json_response({"code": 514, "msg": "auth failed"})
        host = request.host
        config = {"ReconnectCount": 0, "ReconnectInterval": 1, "ReconnectNonce": 0, "PingInterval": 120}
        url = f"ws://{host}/ws?device_id=dev1&service_id=7"
        return web.json_response({"code": 0, "msg": "ok", "data": {"URL": url, "ClientConfig": config}})

    async def _ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        self._ws_ready.set()
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                continue
            frame = Frame()
            frame.ParseFromString(msg.data)
            headers = {h.key: h.value for h in frame.headers}
            waiter = self._acks.pop(headers.get("message_id", ""), None)
            if waiter is not None and frame.method == 1 and not waiter.done():
                waiter.set_result(json.loads(frame.payload))
        return ws

    async def push(
        self, payload: dict[str, Any], *, frame_type: str = "event", parts: int = 1, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Send a data frame (split into `parts` fragments) over the long connection; returns the ack."""
        await asyncio.wait_for(self._ws_ready.wait(), timeout)
        assert self._ws is not None
        frame_id = f"frame-{next(self._ids)}"
        data = json.dumps(payload).encode()
        size = -(-len(data) // parts)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[frame_id] = waiter
        for seq in range(parts):
            frame = Frame(SeqID=1, LogID=1, service=7, method=1, payload=data[seq * size : (seq + 1) * size])
            headers = (("type", frame_type), ("message_id", frame_id), ("trace_id", "tr"), ("sum", str(parts)), ("seq", str(seq)))
            for key, value in headers:
                header = frame.headers.add()
                header.key, header.value = key, value
            await self._ws.send_bytes(frame.SerializeToString())
        ack = await asyncio.wait_for(waiter, timeout)
        if ack.get("data"):
            ack["data"] = json.loads(base64.b64decode(ack["data"]))
        self.acks.append(ack)
        return ack


def _kind(call: Call) -> str:
    path = call.path
    if path.endswith("/tenant_access_token/internal"):
        return "token"
    if path.endswith("/bot/v3/info"):
        return "bot_info"
    if path.endswith("/reply"):
        return "reply"
    if path.endswith("/reactions"):
        return "reaction"
    if "/contact/v3/users/" in path:
        return "user"
    if path.endswith("/members"):
        return "chat_members"
    if "/cardkit/v1/cards" in path:
        return "card_stream" if path.endswith("/content") else "card_settings" if path.endswith("/settings") else "card_create"
    if call.method == "PATCH":
        return "patch"
    if call.method == "PUT":
        return "edit"
    if call.method == "DELETE":
        return "recall"
    return "create"
