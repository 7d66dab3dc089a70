"""The Bolt listeners: Slack requests in, one core call each, nothing else.

What belongs here: the event listener (a mention or a DM -> `core.accept_message`), the button
listeners (Approve -> `core.decide`; Reject -> the reason modal; Edit -> `core.open_edit` and the
Edit modal; View full request -> a modal with every frozen argument), the modal submissions
(-> `core.decide` with the reason; -> `core.edit`, problems shown in the modal under the field
they concern with `response_action: errors`), and the error hook. The app runs with
`process_before_response=True`, so a listener finishes before Slack gets its answer: an
acknowledged message is always recorded, and one that could not be recorded (StorageError)
is answered 500 (HTTP) or left unacknowledged (Socket Mode), so Slack delivers it again.
Retries are never dropped by their headers; the core's dedupe keys make them harmless.
Before a message or a decision reaches the core, the person is looked up (users.info for the
bot flag, locale and time zone, `groups.py` for the policy's user groups), concurrently and
bounded to about a second, and their language is made current (`bot.core.language`).
In-chat commands (`help`, `pending`, `cancel`, in English or Chinese, as a whole message or
through the `/chatops` slash command) are answered here through `bot.core.commands` and never
reach the model: `help` and `pending` privately (ephemeral; pending cards keep working buttons),
`cancel` in the thread.
The App Home tab (`app_home_opened`) is published here (`home.py` renders it); its Approve/Reject
buttons carry the card's action ids, so they reach `on_approve` / `on_reject` like the card's:
the same `Core.decide`, audit and authorisation. A click from the home re-publishes it with the
outcome on top; later changes arrive as `home_refresh` outbox jobs (`SlackAdapter.publish_home`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, TypeVar

from slack_bolt.async_app import AsyncAck, AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.web.async_client import AsyncWebClient

from bot.core import commands, language, texts
from bot.core.approvals import EditOutcome, EditResult
from bot.core.cards import load_card
from bot.core.engine import Core
from bot.core.errors import StorageError
from bot.core.events import DecisionRequest, EditRequest, Thread, User, checked_approval_id
from bot.core.home import home_for
from bot.slack import events
from bot.slack.blocks import card_blocks, card_text, edit_modal, full_view, reject_modal, safe_message
from bot.slack.client import BotIdentity, SlackUnavailable, UserDirectory
from bot.slack.events import team_of as workspace_of
from bot.slack.groups import SlackGroups
from bot.slack.home import home_view

log = logging.getLogger("chatops.slack")

_Request = TypeVar("_Request", DecisionRequest, EditRequest)
Spawn = Callable[[Coroutine[Any, Any, Any], str], None]
# Outcomes the card already shows; anything else is told privately to the clicker.
_SHOWN_ON_CARD = frozenset({"approved", "rejected"})
COPY_URL_LIMIT = 200  # a recorded copy's id (`card_copy.message_id`); Slack's response_urls are ~90 characters
SLASH_COMMAND = "/chatops"


def _modal_errors(outcome: EditOutcome, meta: dict[str, Any]) -> dict[str, str]:
    """Problems by input block: each under its field; the rest (and refusals) under the first input."""
    first = str(meta.get("first") or "")
    errors: dict[str, str] = {}
    for name, problem in (outcome.errors or {"": outcome.message}).items():  # "": the form as a whole
        block = events.ARG_BLOCK + name if name else first
        errors[block] = f"{errors[block]}; {problem}" if block in errors else str(problem)
    if not outcome.errors or "" in outcome.errors:
        errors[first] = errors.get(first) or str(outcome.message)
    return {k: v[:2000] for k, v in errors.items() if k}


class SlackHandlers:
    """Listeners bound to one core; `register` attaches them to a Bolt app."""

    def __init__(
        self, core: Core, client: AsyncWebClient, identity: BotIdentity, users: UserDirectory, groups: SlackGroups, spawn: Spawn
    ) -> None:
        self.core = core
        self.client = client
        self.identity = identity
        self.users = users
        self.groups = groups
        self.spawn = spawn

    def register(self, app: AsyncApp) -> None:
        app.event("app_mention")(self.on_event)
        app.event("message")(self.on_event)
        app.action(events.APPROVE_ACTION)(self.on_approve)
        app.action(events.REJECT_ACTION)(self.on_reject)
        app.view(events.REJECT_VIEW)(self.on_reject_submit)
        app.action(events.VIEW_ACTION)(self.on_view_full)
        app.action(events.EDIT_ACTION)(self.on_edit)
        app.view(events.EDIT_VIEW)(self.on_edit_submit)
        app.command(SLASH_COMMAND)(self.on_slash_command)
        app.event("app_home_opened")(self.on_home_opened)
        app.event(re.compile(".*"))(self.on_other_event)  # last: any other event is acknowledged, not retried
        app.error(self.on_error)

    # ------------------------------------------------------------------ messages
    async def on_event(self, body: dict[str, Any], event: dict[str, Any], request: AsyncBoltRequest) -> None:
        """A mention or a DM: record it (the core runs the agent in the background)."""
        bot_user_id = self.identity.bot_user_id
        if not events.is_for_bot(event, bot_user_id):
            return
        author = await self._lookup(str(events.author_id(event)))
        msg = events.message_from_event(body, event, bot_user_id, author)
        if msg is None:
            return
        user = language.speak_with(
            self.core.ctx.policy, msg.user, msg.channel_id, locale=author.locale, tz=author.tz, text=msg.text
        )
        msg = replace(msg, user=user)
        if not msg.text:
            self.spawn(self._post(msg.thread.coords, str(texts.EMPTY_MESSAGE)), "slack-empty-message")
            return
        if (command := commands.parse(msg.text)) is not None:
            if (request.headers.get("x-slack-retry-num") or ["0"])[0] != "0":
                return  # answered on the first delivery (commands run before the ack)
            where = commands.Where("slack", msg.channel_id, msg.conversation_key, msg.thread)
            reply = await commands.run(self.core, command, user, where)
            self.spawn(self._answer(command, reply, user, msg.thread.coords), f"slack-{command}")
            return
        accepted = await self.core.accept_message(msg)  # StorageError -> 500 / no ack -> Slack redelivers
        retry = (request.headers.get("x-slack-retry-num") or ["0"])[0]
        log.debug("slack event %s (retry %s): %s", body.get("event_id"), retry, "recorded" if accepted else "duplicate")

    async def on_other_event(self, event: dict[str, Any]) -> None:
        """An event type we do not use (a subscription added by hand): acknowledge it so Slack stops sending it again."""
        log.debug("slack: ignored a %s event", event.get("type"))

    async def _lookup(self, user_id: str) -> events.Author:
        """users.info (name, bot flag) and the policy's user groups, asked together; each is bounded in time."""
        author, groups = await asyncio.gather(self.users.author(user_id), self.groups.groups_of(user_id))
        return replace(author, groups=groups)

    async def _identified(self, request: _Request, channel: str | None = None) -> _Request:
        """The decider as the policy judges them (bot flag and group memberships looked up now),
        speaking their language. The approval id is checked here too: a malformed one becomes a
        stand-in that is "not found"."""
        request = replace(request, approval_id=checked_approval_id(request.approval_id))
        author = await self._lookup(request.user.id)
        is_bot = author.is_bot or request.user.id == self.identity.bot_user_id
        user = replace(request.user, is_bot=is_bot, groups=author.groups)
        fallback = None if author.locale else await language.card_language(self.core.ctx, request.approval_id)
        user = language.speak_with(self.core.ctx.policy, user, channel, locale=author.locale, tz=author.tz, fallback=fallback)
        return replace(request, user=user)

    async def _post(self, coords: dict[str, Any], text: str) -> None:
        await self.client.chat_postMessage(channel=coords["channel"], thread_ts=coords.get("thread_ts"), text=safe_message(text))

    # ------------------------------------------------------------------ approvals
    async def on_approve(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Approve: decide now (a fast, conditional DB update); the core updates the card and runs the tool."""
        await ack()
        try:
            request = await self._identified(events.decision_from_action(body, action), events.click_place(body)["channel"])
            outcome = await self.core.decide(request)
        except StorageError as exc:
            self._click_not_recorded(body, exc)
            return
        log.info("slack click on %s by %s: %s", request.approval_id, request.user.key, outcome.kind)
        if events.from_home(body):
            self.spawn(self.publish_home(request.user, str(outcome.message)), "slack-home-click")
        elif outcome.kind not in _SHOWN_ON_CARD:
            place = events.click_place(body)
            self.spawn(self._tell(place, request.user.id, outcome.message), "slack-ephemeral")
        self._track_copy(events.copy_url(body), request.approval_id)

    def _track_copy(self, url: str | None, approval_id: str) -> None:
        """A card re-posted privately (`pending`) cannot be edited like the card in the thread: once
        clicked, its `response_url` is recorded as a copy of the card, which the outbox then replaces
        with each new rendering (the decision's included) as long as Slack accepts it (30 minutes)."""
        if url and len(url) <= COPY_URL_LIMIT:
            self.spawn(self.core.card_copied(approval_id, Thread(events.PLATFORM, {"response_url": url}), url), "slack-copy")

    def _click_not_recorded(self, body: dict[str, Any], error: StorageError) -> None:
        """Slack never sends a click again: the clicker is told, in one sentence, to click again."""
        log.warning("slack click not recorded (the clicker is asked to click again): %s", error)
        user_id = str((body.get("user") or {}).get("id"))
        if events.from_home(body):
            user = User(events.PLATFORM, user_id, tenant=workspace_of(body))
            self.spawn(self.publish_home(user, str(texts.CLICK_NOT_RECORDED)), "slack-home-click")
        else:
            self.spawn(self._tell(events.click_place(body), user_id, str(texts.CLICK_NOT_RECORDED)), "slack-ephemeral")

    async def on_reject(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Reject: open the modal asking why; the decision happens when it is submitted."""
        await ack()
        await self._identified(events.decision_from_action(body, action), events.click_place(body)["channel"])
        place = {**events.click_place(body), "revision": events.revision_of(action), "copy": events.copy_url(body)}
        view = reject_modal(checked_approval_id(str(action.get("value") or "")), place)
        self.spawn(self._open(str(body.get("trigger_id")), view), "slack-reject-modal")

    async def on_reject_submit(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        """The modal was submitted: reject with the reason; refusals are shown inside the modal."""
        request, meta = events.decision_from_view(body)
        try:
            request = await self._identified(request, meta.get("channel"))
            outcome = await self.core.decide(request)
        except StorageError as exc:  # shown in the modal, which stays open: submitting again is the retry
            log.warning("slack reject not recorded (the modal asks to submit again): %s", exc)
            await ack(response_action="errors", errors={events.REASON_BLOCK: str(texts.CLICK_NOT_RECORDED)})
            return
        log.info("slack reject of %s by %s: %s", request.approval_id, request.user.key, outcome.kind)
        if outcome.kind in _SHOWN_ON_CARD:
            await ack()
        else:
            await ack(response_action="errors", errors={events.REASON_BLOCK: str(outcome.message)})
        self._track_copy(meta.get("copy"), request.approval_id)

    async def on_edit(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Edit: the modal with the frozen arguments in typed inputs (or, privately, why not)."""
        await ack()
        place = events.click_place(body)
        try:
            request = await self._identified(events.edit_from_action(body, action), place["channel"])
            outcome = await self.core.open_edit(request)
        except StorageError as exc:
            self._click_not_recorded(body, exc)
            return
        if outcome.form is None:
            self.spawn(self._tell(place, request.user.id, outcome.message), "slack-ephemeral")
            return
        view = edit_modal(outcome.form, {**place, "copy": events.copy_url(body)}, request.user.lang, request.user.tz)
        self.spawn(self._open(str(body.get("trigger_id")), view), "slack-edit-modal")

    async def on_edit_submit(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        """The Edit modal was submitted: a new version of the call, or the problems under their fields."""
        request, meta = events.edit_from_view(body)
        request = replace(request, approval_id=checked_approval_id(request.approval_id))
        try:
            request = await self._identified(request, meta.get("channel"))
            outcome = await self.core.edit(request)
        except StorageError as exc:  # shown in the modal, which stays open: saving again is the retry
            log.warning("slack edit not recorded (the modal asks to save again): %s", exc)
            await ack(response_action="errors", errors={str(meta.get("first") or ""): str(texts.CLICK_NOT_RECORDED)})
            return
        log.info("slack edit of %s by %s: %s", request.approval_id, request.user.key, outcome.kind)
        if outcome.kind == EditResult.EDITED:
            await ack()
            self.spawn(self._tell(meta, request.user.id, outcome.message), "slack-ephemeral")
            self._track_copy(meta.get("copy"), request.approval_id)
            return
        await ack(response_action="errors", errors=_modal_errors(outcome, meta))

    async def on_view_full(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        """ "View full request": open a modal with every frozen argument, straight from the click's trigger_id."""
        await ack()
        self.spawn(self._show_full(body, str(action.get("value") or "")), "slack-full-view")

    async def _show_full(self, body: dict[str, Any], approval_id: str) -> None:
        place = events.click_place(body)
        found = await load_card(self.core.ctx.db, approval_id)
        if found is None or found[1].coords.get("channel") != place.get("channel"):
            user_id = str((body.get("user") or {}).get("id"))
            await self._tell(place, user_id, texts.FULL_NOT_FOUND.format(approval_id=approval_id[:40]))
            return
        await self._open(str(body.get("trigger_id")), full_view(found[0]))

    async def _tell(self, place: dict[str, Any], user_id: str, text: str) -> None:
        """A private line: a sentence of ours, which may quote what others typed (a `pending` list quotes
        each request's summary), so no link or broadcast in it takes effect (`safe_message`)."""
        if not place.get("channel"):
            return
        await self.client.chat_postEphemeral(
            channel=place["channel"], user=user_id, text=safe_message(str(text)), thread_ts=place.get("thread_ts")
        )

    # ------------------------------------------------------------------ App Home
    async def on_home_opened(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        """The person opened the app: publish their home (pending approvals, recent requests)."""
        if event.get("tab") != "home" or not event.get("user"):
            return
        user = User(events.PLATFORM, str(event["user"]), tenant=workspace_of(body))
        self.spawn(self.publish_home(user), "slack-home")

    async def publish_home(self, user: User, notice: str | None = None) -> None:
        """Build the person's home view now, in their language, and publish it (`views.publish`)."""
        author = await self._lookup(user.id)
        user = replace(user, name=user.name or author.name, is_bot=author.is_bot, groups=author.groups)
        lang = language.choose(self.core.ctx.policy, user, None, locale=author.locale)
        user = replace(user, lang=lang, tz=author.tz or user.tz)  # `home_view` renders in it; nothing else changes
        view = await home_for(self.core, user)
        await self.client.views_publish(user_id=user.id, view=home_view(view, notice))

    # ------------------------------------------------------------------ commands
    async def on_slash_command(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        """`/chatops help | pending | cancel`: acknowledged at once, answered privately (cancel: in public)."""
        await ack()
        user, channel, key = events.command_place(body)
        author = await self._lookup(user.id)
        user = language.speak_with(
            self.core.ctx.policy, replace(user, groups=author.groups), channel, locale=author.locale, tz=author.tz
        )
        text = str(body.get("text") or "").strip() or "help"
        command = commands.parse(text)
        if command is None:
            self.spawn(
                self._tell({"channel": channel}, user.id, texts.COMMAND_UNKNOWN.format(command=text[:50])), "slack-command"
            )
            return
        reply = await commands.run(self.core, command, user, commands.Where("slack", channel, key))
        self.spawn(self._answer(command, reply, user, {"channel": channel, "thread_ts": None}), f"slack-{command}")

    async def _answer(self, command: str, reply: commands.Reply, user: User, coords: dict[str, Any]) -> None:
        """A command's answer: cancel in the thread; help and pending privately, pending cards with live buttons."""
        place = {"channel": coords.get("channel"), "thread_ts": coords.get("thread_ts")}
        if command == "cancel":
            await self._post(coords, reply.text)
            return
        await self._tell(place, user.id, reply.text)
        for card in reply.cards:
            await self.client.chat_postEphemeral(
                channel=str(place["channel"]),
                user=user.id,
                thread_ts=place.get("thread_ts"),
                text=card_text(card),
                blocks=card_blocks(card),
            )

    async def _open(self, trigger_id: str, view: dict[str, Any]) -> None:
        await self.client.views_open(trigger_id=trigger_id, view=view)

    # ------------------------------------------------------------------ errors
    async def on_error(self, error: Exception, body: dict[str, Any]) -> BoltResponse | None:
        """Log one line (never the payload). A passing fault (the database, Slack itself) answers 503
        and anything else 500 (Bolt's), so Slack delivers the event again either way."""
        what = body.get("event_id") or body.get("type") or "request"
        if isinstance(error, StorageError | SlackUnavailable):
            log.warning("slack %s not processed, Slack will redeliver it: %s", what, error)
            return BoltResponse(status=503, body="")
        log.error("slack %s failed: %s", what, type(error).__name__, exc_info=error)
        return None
