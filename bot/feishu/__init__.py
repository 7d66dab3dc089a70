"""The Feishu / Lark channel adapter (GitHub issue #4): `FeishuAdapter(core, settings)`.

Layout of the package (each module says what belongs in it):
- `events.py`   Feishu JSON -> `IncomingMessage` / `DecisionRequest` (mentions, threads, dedupe keys);
- `cards.py`    `CardView` -> card JSON 2.0 (under 30 KB) and the card-callback answer;
- `webhook.py`  decryption, signature, token and timestamp checks for `POST /feishu/events`;
- `longconn.py` lark-oapi's websocket client in its own thread and event loop;
- `client.py`   lark-oapi service calls (`sdk.ApiClient`) with timeouts, token refresh and rate-limit backoff;
- `groups.py`   department and group-chat memberships for the policy's `feishu-dept:`/`feishu-group:` entries;
- `stream.py`   a long answer as a CardKit streaming card, with a plain reply as fallback.

This module is the `Channel` the core talks to (reply in the thread, "OnIt" reaction, card post and
patch, the run's progress line and its answer) plus the adapter's lifecycle. In: the webhook route (FEISHU_MODE=webhook) and the long
connection (FEISHU_MODE=ws, the default) both end in `dispatch(payload)`, which translates the JSON
and calls `core.accept_message` or `core.decide` (with the person's memberships looked up first,
within about a second, when the policy names departments or chats). Nothing slow happens there:
the core records and returns; runs, tools and card patches happen in the core's background tasks.
Each person's language is chosen on the way in (`bot.core.language`; Feishu defaults to Chinese).
In-chat commands (`帮助`/`help`, `待审批`/`pending`, `取消`/`cancel`) and the bot menu
(`application.bot.menu_v6`, whose entries' `event_key` is one of those words) are answered through
`bot.core.commands` and never reach the model. A card's Edit, Save and Cancel buttons end in
`core.open_edit` / `core.edit` and are answered with the edit form card, or a toast and the card.
lark-oapi is imported lazily (it takes seconds) and no lark type leaves this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from bot.config import Settings
from bot.core import commands, i18n, language, metrics, texts
from bot.core.cards import cut, load_card
from bot.core.channels import CardView
from bot.core.engine import Core
from bot.core.errors import ConfigError, StorageError
from bot.core.events import Thread, User, checked_approval_id
from bot.core.refusals import record_refused_request
from bot.feishu import cards, events, stream
from bot.feishu.client import RATE_LIMITED, TOKEN_INVALID, CredentialsRejected, FeishuApi, FeishuApiError
from bot.feishu.groups import FeishuGroups
from bot.feishu.longconn import LongConnection
from bot.feishu.webhook import Rejected, open_envelope

__all__ = ["FeishuAdapter"]

log = logging.getLogger("chatops.feishu")

ROUTE = "/feishu/events"
_AT_TAG = re.compile(r"<(?=at\b)", re.IGNORECASE)
WORKING_EMOJI = "OnIt"
TEXT_LIMIT = 20_000
HANDLER_BUDGET = 2.5  # seconds; Feishu wants an answer within 3
LOOP_MARGIN = 0.25  # seconds the long connection's thread gives the bot's loop beyond that
START_BUDGET = 15.0  # seconds start() waits for the bot's identity
BOT_ID_RETRY = 30.0  # the longest wait between two attempts to learn it (bot info counts against the API quota)
TOKEN_RECHECK = 60.0  # seconds between two bot-info calls made for /readyz


def still_working() -> dict[str, Any]:
    """The answer to a click that takes longer than Feishu waits: it was received and goes on; not an
    error (the decision may land a moment later). In the platform's language: the click's own is not known yet."""
    with i18n.speaking(language.PLATFORM_DEFAULTS.get(events.PLATFORM)):
        return {"toast": {"type": "info", "content": str(texts.CLICK_STILL_WORKING)}}


class NotReady(Exception):
    """A group message arrived before the bot knows its own open_id: answer non-2xx, Feishu redelivers."""


@dataclass(frozen=True)
class Answer:
    """What to send back to Feishu for one payload; `approval_id` is set for card clicks."""

    body: dict[str, Any]
    approval_id: str | None = None


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


class FeishuAdapter:
    """The Feishu channel. `FeishuAdapter(core, settings)`; the App calls start/stop/routes."""

    platform = "feishu"

    def __init__(self, core: Core, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        assert settings.feishu_app_id and settings.feishu_app_secret, "Feishu is not configured"
        self.core = core
        self.settings = settings
        self.clock = clock
        self.api = FeishuApi(
            app_id=settings.feishu_app_id,
            app_secret=settings.feishu_app_secret.get_secret_value(),
            domain=settings.feishu_domain,
        )
        self.groups = FeishuGroups(self.api, lambda: core.ctx.policy.group_refs(events.PLATFORM))
        self.bot_open_id: str | None = None
        self._bot_id_task: asyncio.Task[None] | None = None
        self._bot_id_next = 0.0
        self._bot_id_backoff = 1.0
        self._bot_id_error: FeishuApiError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._long: LongConnection | None = None
        self._answering: dict[str, asyncio.Event] = {}
        self.token_recheck = TOKEN_RECHECK
        self.click_budget = HANDLER_BUDGET  # seconds a click is worked on before Feishu gets "still working"
        self._token_checked: float | None = None
        self._token_problem: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def routes(self) -> list[web.RouteDef]:
        if self.settings.feishu_mode != "webhook":
            return []
        return [web.post(ROUTE, self._webhook)]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.api.open()
        self._learn_bot_id()
        if self._bot_id_task is not None:  # Feishu down at boot: start anyway, learn it later
            await asyncio.wait({self._bot_id_task}, timeout=START_BUDGET)
        if isinstance(self._bot_id_error, CredentialsRejected):
            raise ConfigError("FEISHU_APP_SECRET", f"was rejected by Feishu (code {self._bot_id_error.code})")
        if self.settings.feishu_mode == "ws":
            self._long = LongConnection(
                app_id=self.api.app_id,
                app_secret=_secret(self.settings.feishu_app_secret) or "",
                domain=self.api.domain,
                handler=self._from_long_connection,
            )
            await self._long.start()

    async def open_for_delivery(self) -> None:
        """A worker posts through the API client alone (no bot identity, no long connection), built
        at its first post: a worker that never posts to Feishu never imports lark-oapi."""

    async def not_ready(self) -> list[str]:
        """Tenant token and bot identity known (asked again every `token_recheck` s); long connection up when used."""
        if self._loop is None:
            return ["not started"]
        checked = self._token_checked
        if checked is None or time.monotonic() - checked >= self.token_recheck or self._token_problem:
            self._token_problem = await self._check_token()
            self._token_checked = time.monotonic()
        problems = [self._token_problem] if self._token_problem else []
        if self.bot_open_id is None:
            problems.append("the bot's own identity (bot info) is not known")
        if self.settings.feishu_mode == "ws" and (self._long is None or not self._long.connected):
            problems.append("the long connection is down")
        return problems

    async def _check_token(self) -> str | None:
        try:
            self.bot_open_id = await self.api.bot_open_id()
        except CredentialsRejected as exc:
            return f"FEISHU_APP_SECRET was rejected: no tenant token (code {exc.code})"
        except FeishuApiError as exc:
            return f"bot info failed (code {exc.code})"
        return None

    async def stop(self) -> None:
        if self._long is not None:
            await self._long.stop()
            self._long = None
        if self._bot_id_task is not None:
            self._bot_id_task.cancel()
        await self.groups.close()

    async def close(self) -> None:
        """Nothing of ours to release: lark-oapi's client opens and closes its own connections."""

    def _learn_bot_id(self) -> None:
        """Fetch the bot's open_id in the background (once; again on demand while unknown, with backoff)."""
        idle = self._bot_id_task is None or self._bot_id_task.done()
        if self.bot_open_id is None and idle and time.monotonic() >= self._bot_id_next:
            self._bot_id_next = time.monotonic() + self._bot_id_backoff
            self._bot_id_backoff = min(BOT_ID_RETRY, self._bot_id_backoff * 2)
            self._bot_id_task = asyncio.get_running_loop().create_task(self._fetch_bot_id(), name="feishu-bot-info")

    async def _fetch_bot_id(self) -> None:
        try:
            self.bot_open_id = await self.api.bot_open_id()
            log.info("feishu: the bot is %s", self.bot_open_id)
        except FeishuApiError as exc:
            self._bot_id_error = exc
            log.error("feishu: cannot read the bot's identity (%s); group messages are refused until it is known", exc)
        except Exception as exc:  # noqa: BLE001 - logged with its reason and asked again soon
            log.error("feishu: cannot read the bot's identity (%s); asking again shortly", type(exc).__name__)

    # ------------------------------------------------------------------ inbound
    async def dispatch(self, payload: dict[str, Any]) -> Answer:
        """Handle one verified payload. Raises BadPayload, or StorageError/NotReady (Feishu must redeliver)."""
        kind = events.event_type(payload)
        if kind == "im.message.receive_v1":
            if self.bot_open_id is None and not events.is_direct(payload):
                self._learn_bot_id()
                raise NotReady("the bot's own open_id is not known yet, so @mentions cannot be checked")
            msg = events.to_message(payload, bot_open_id=self.bot_open_id)
            if msg is not None:
                user = language.speak_with(self.core.ctx.policy, await self._identified(msg.user), msg.channel_id, text=msg.text)
                msg = replace(msg, user=user)
                if (command := commands.parse(msg.text)) is not None:
                    where = commands.Where(events.PLATFORM, msg.channel_id, msg.conversation_key, msg.thread)
                    reply = await commands.run(self.core, command, user, where)
                    # help and pending answer the person alone (as on Slack): the pending list and its
                    # cards show requests of other chats; only cancel, about this thread, answers here
                    private = command != "cancel" and not events.is_direct(payload)
                    answer = self._answer(reply, open_id=user.id) if private else self._answer(reply, thread=msg.thread)
                    self.core.ctx.tasks.spawn(answer, name=f"feishu-{command}")
                elif not await self.core.accept_message(msg):
                    log.debug("feishu: duplicate delivery %s", msg.dedupe_keys)
            return Answer({})
        if events.is_click(payload) and events.card_verb(payload) in events.EDIT_VERBS:
            return await self._edit_action(payload)
        if events.is_click(payload):
            request = events.to_decision(payload)
            request = replace(request, approval_id=checked_approval_id(request.approval_id))
            self._answering.setdefault(request.approval_id, asyncio.Event())
            try:
                request = replace(request, user=await self._clicker(request.user, request.approval_id, payload))
                outcome = await self.core.decide(request)
                if outcome.changed:
                    await self.core.card_answered(request.approval_id)
            except StorageError as exc:  # a click is not sent again: the clicker is told to click again
                self._answered(request.approval_id)
                log.warning("feishu click not recorded (the clicker is asked to click again): %s", exc)
                return Answer({"toast": {"type": "error", "content": str(texts.CLICK_NOT_RECORDED)}})
            except BaseException:
                self._answered(request.approval_id)
                raise
            return Answer(cards.callback_response(outcome), request.approval_id)
        if kind == "application.bot.menu_v6":
            await self._menu(payload)
            return Answer({})
        return Answer({})  # another subscribed event: acknowledge, never 500

    async def _edit_action(self, payload: dict[str, Any]) -> Answer:
        """Edit (-> the edit form card), Save (-> `core.edit`) or Cancel (-> the card as it is) on a card."""
        verb, request = events.to_edit(payload)
        request = replace(request, approval_id=checked_approval_id(request.approval_id))
        self._answering.setdefault(request.approval_id, asyncio.Event())
        try:
            user = await self._clicker(request.user, request.approval_id, payload)
            request = replace(request, user=user)
            if verb == "edit":
                outcome = await self.core.open_edit(request)
            elif verb == "edit_submit":
                outcome = await self.core.edit(request)
            else:
                found = await load_card(self.core.ctx.db, request.approval_id)
                return Answer(
                    {"card": {"type": "raw", "data": cards.render_card(found[0])}} if found else {}, request.approval_id
                )
        except BaseException:
            self._answered(request.approval_id)
            raise
        log.info("feishu %s of %s by %s: %s", verb, request.approval_id, user.key, outcome.kind)
        return Answer(cards.edit_response(outcome, user.lang, user.tz), request.approval_id)

    async def _menu(self, payload: dict[str, Any]) -> None:
        """A bot menu entry: its `event_key` names the command; the answer goes to the person directly."""
        who, key = events.to_menu(payload)
        user = language.speak_with(self.core.ctx.policy, await self._identified(who), None)
        command = commands.parse(key)
        if command is None:
            log.warning("feishu: a bot menu entry with an unknown event_key %r", key[:50])
            reply = commands.Reply(texts.COMMAND_UNKNOWN.format(command=key[:50]))
        else:
            conversation = await commands.latest_conversation(self.core, user) if command == "cancel" else None
            reply = await commands.run(self.core, command, user, commands.Where(events.PLATFORM, None, conversation))
        self.core.ctx.tasks.spawn(self._answer(reply, open_id=user.id), name="feishu-menu")

    async def _answer(self, reply: commands.Reply, *, thread: Thread | None = None, open_id: str | None = None) -> None:
        """A command's answer in the thread (or to the person), then each pending card with working
        buttons: a copy of the card, recorded so that it is patched with the card from then on."""
        where = thread or Thread(events.PLATFORM, {"open_id": open_id})
        messages: list[tuple[str, str, str | None]] = [("text", self._text(reply.text), None)]  # no <at> may take effect
        messages += [("interactive", json.dumps(cards.render_card(c), ensure_ascii=False), c.approval_id) for c in reply.cards]
        for msg_type, content, approval_id in messages:
            try:
                if thread is not None:
                    message_id = await self._post(thread, msg_type, content, key=None)
                else:
                    message_id = await self.api.send(str(open_id), msg_type, content, id_type="open_id")
            except FeishuApiError as exc:
                log.warning("feishu: a command answer could not be posted (code %s)", exc.code)
                return
            if approval_id is not None:
                await self.core.card_copied(approval_id, where, message_id)

    async def _clicker(self, user: User, approval_id: str, payload: dict[str, Any]) -> User:
        """Who clicked a card, as the policy judges them, speaking the card's (or the chat's) language."""
        identified = await self._identified(user)
        card_lang = await language.card_language(self.core.ctx, approval_id)
        return language.speak_with(self.core.ctx.policy, identified, events.click_chat(payload), fallback=card_lang)

    async def _identified(self, user: User) -> User:
        """The person as the policy judges them: memberships looked up now; the bot itself counts as a bot."""
        groups = await self.groups.groups_of(user.id)
        return replace(user, groups=groups, is_bot=user.is_bot or user.id == self.bot_open_id)

    def _answered(self, approval_id: str | None) -> None:
        if approval_id is not None and (event := self._answering.pop(approval_id, None)):
            event.set()

    async def _webhook(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await self._answer_webhook(request)
            status = response.status
            return response
        finally:
            metrics.observe_ack(events.PLATFORM, status, time.perf_counter() - started)

    async def _answer_webhook(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            envelope = open_envelope(
                request.headers,
                body,
                encrypt_key=_secret(self.settings.feishu_encrypt_key),
                verification_token=_secret(self.settings.feishu_verification_token),
                now=self.clock(),
            )
        except Rejected as exc:
            log.warning("feishu webhook refused (%d): %s", exc.status, exc.reason)
            if exc.signed:
                await record_refused_request(self.core.ctx, self.platform, exc.reason)
            return web.json_response({"msg": exc.reason}, status=exc.status)
        if envelope.challenge is not None:
            return web.json_response({"challenge": envelope.challenge})
        try:
            answer = await self._within_budget(envelope.payload)
        except events.BadPayload as exc:
            log.warning("feishu webhook: unreadable event (%s)", exc)
            await record_refused_request(self.core.ctx, self.platform, f"unreadable event ({exc})")
            return web.json_response({"msg": "unreadable event"}, status=400)
        except (StorageError, NotReady):
            return web.json_response({"msg": "try again"}, status=503)
        except Exception:
            log.exception("feishu webhook: handling a verified event failed")
            return web.json_response({"msg": "try again"}, status=503)
        response = web.json_response(answer.body)
        try:
            await response.prepare(request)
            await response.write_eof()
        finally:
            self._answered(answer.approval_id)
        return response

    async def _within_budget(self, payload: dict[str, Any]) -> Answer:
        """`dispatch`, except that a click still in hand after `click_budget` is answered at once
        (Feishu shows an error past 3 s) while it goes on: the card shows its outcome when it lands."""
        if not events.is_click(payload):
            return await self.dispatch(payload)
        handling = asyncio.ensure_future(self.dispatch(payload))
        try:
            return await asyncio.wait_for(asyncio.shield(handling), self.click_budget)
        except TimeoutError:
            self.core.ctx.tasks.spawn(self._finish_click(handling, payload), name="feishu-slow-click")
            return Answer(still_working())

    async def _finish_click(self, handling: asyncio.Future[Answer], payload: dict[str, Any]) -> None:
        """A click answered "still working": a refusal or failure it ends in (its toast an error or a
        warning) is said to the clicker in a direct message, since nobody sees the late answer."""
        answer = await handling
        self._answered(answer.approval_id)  # no answer of its own will be shown: the card's patch may go
        toast = answer.body.get("toast") or {}
        open_id = events.clicker_open_id(payload)
        if toast.get("type") in ("error", "warning") and open_id:
            await self.api.send(open_id, "text", self._text(str(toast.get("content") or "")), id_type="open_id")

    def _from_long_connection(self, raw: bytes) -> dict[str, Any] | None:
        """Runs on the SDK's thread: hand the payload to the main loop, wait (bounded), answer."""
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError):
            log.warning("feishu long connection: a frame is not JSON; ignored")
            return None
        if not isinstance(payload, dict) or self._loop is None:
            return None
        started = time.perf_counter()
        future = asyncio.run_coroutine_threadsafe(self._within_budget(payload), self._loop)
        status = 500
        try:
            answer = future.result(timeout=HANDLER_BUDGET + LOOP_MARGIN)
            status = 200
        except TimeoutError:
            if not events.is_click(payload):
                raise  # an event: the error ack makes Feishu deliver it again (its key is recorded once)
            status = 200  # the bot's loop did not even answer in time; the click goes on there
            return still_working()
        except events.BadPayload as exc:
            status = 400
            log.warning("feishu long connection: unreadable event (%s)", exc)
            return None
        finally:
            metrics.observe_ack(events.PLATFORM, status, time.perf_counter() - started)
        self._loop.call_soon_threadsafe(self._answered, answer.approval_id)
        return answer.body if answer.approval_id is not None else None

    # ------------------------------------------------------------------ Channel
    async def post_reply(self, thread: Thread, text: str) -> None:
        safe = _AT_TAG.sub("<\u200b", cut(text, TEXT_LIMIT))  # model output cannot @mention anyone
        await self._post(thread, "text", json.dumps({"text": safe}, ensure_ascii=False), key=None)

    async def show_working(self, thread: Thread) -> None:
        await self.api.open()
        try:
            await self.api.react(thread.coords["message_id"], WORKING_EMOJI)
        except FeishuApiError as exc:
            log.warning("feishu: reaction failed (%s); saying it instead", exc.code)
            await self.post_reply(thread, str(texts.WORKING))

    async def post_progress(self, thread: Thread, text: str) -> str | None:
        """The run's progress line: a text message, edited in place later (`update_progress`)."""
        return await self._post(thread, "text", self._text(text), key=None)

    async def update_progress(self, thread: Thread, message_id: str, text: str) -> None:
        await self.api.open()
        await self.api.edit(message_id, "text", self._text(text))

    async def post_answer(self, thread: Thread, text: str, progress_id: str | None) -> None:
        """The answer: a CardKit streaming card when long (the progress line is then withdrawn), else
        in place of the progress line; a plain reply when there is none, or when the edit is refused
        (e.g. the message can no longer be edited)."""

        async def post(msg_type: str, content: str) -> str:
            return await self._post(thread, msg_type, content, key=None)

        await self.api.open()  # a worker builds its client at its first post
        if len(text) > stream.STREAM_AFTER and await stream.stream_answer(self.api, post, text):
            if progress_id is not None:
                try:
                    await self.api.recall(progress_id)
                except FeishuApiError as exc:  # cosmetic: the answer is there; never post it twice
                    log.warning("feishu: could not withdraw the progress line (code %s)", exc.code)
            return
        if progress_id is not None:
            try:
                await self.api.edit(progress_id, "text", self._text(text))
                return
            except FeishuApiError as exc:
                if exc.code is None or exc.code == RATE_LIMITED or exc.code in TOKEN_INVALID:
                    raise  # try the same edit again later
                log.warning("feishu: the progress message cannot be edited (code %s); replying instead", exc.code)
        await self.post_reply(thread, text)

    @staticmethod
    def _text(text: str) -> str:
        safe = _AT_TAG.sub("<\u200b", cut(text, TEXT_LIMIT))  # model output cannot @mention anyone
        return json.dumps({"text": safe}, ensure_ascii=False)

    async def post_card(self, thread: Thread, card: CardView) -> str | None:
        content = json.dumps(cards.render_card(card), ensure_ascii=False)
        return await self._post(thread, "interactive", content, key=card.approval_id)

    async def update_card(self, thread: Thread, message_id: str, card: CardView) -> None:
        pending = self._answering.get(card.approval_id)
        if pending is not None:  # let the click's own answer land first, then patch over it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pending.wait(), 3)
            self._answering.pop(card.approval_id, None)
        await self.api.open()
        await self.api.patch(message_id, json.dumps(cards.render_card(card), ensure_ascii=False))

    async def _post(self, thread: Thread, msg_type: str, content: str, *, key: str | None) -> str:
        await self.api.open()
        coords = thread.coords
        try:
            return await self.api.reply(coords["message_id"], msg_type, content, in_thread=bool(coords.get("in_thread")), key=key)
        except FeishuApiError as exc:
            if exc.code is None or exc.code == RATE_LIMITED or exc.code in TOKEN_INVALID:
                raise  # not about the message itself: posting elsewhere would fail the same way
            log.warning("feishu: reply failed (code %s); posting in the chat instead", exc.code)
            return await self.api.send(coords["chat_id"], msg_type, content, key=f"{key}-chat" if key else None)
