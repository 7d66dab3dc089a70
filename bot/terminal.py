"""The terminal adapter (like Hubot's shell): chat with the bot on stdin/stdout.

Approval cards are printed as text, every argument in full (neutralised by `bot.core.display`), and
answered with `approve <id>` or `reject <id> [reason]`; `edit <id>` asks for each argument in turn
(Enter keeps it) and submits the edit when the last one is answered; `help`, `pending` and `cancel`
(or 帮助, 待审批, 取消) are the in-chat commands (`bot.core.commands`).
The conversation key is stable per OS user, so a new `chatops shell` picks up where the last
one stopped (pending approvals included); `/new` starts a fresh conversation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TextIO

from bot.core import commands, i18n, language, texts
from bot.core.approvals import EditResult
from bot.core.cards import card_view, quoted, status_lines
from bot.core.channels import CardView
from bot.core.display import inert, one_line
from bot.core.edit_form import EditForm
from bot.core.engine import Core
from bot.core.errors import StorageError
from bot.core.events import DecisionRequest, EditRequest, IncomingMessage, Thread, User


def render_card(card: CardView) -> str:
    """An approval card as plain text, in its requester's language, every value complete; multi-line
    values are quoted under their label."""
    with i18n.speaking(card.lang, card.tz):
        return _render_card(card)


def _render_card(card: CardView) -> str:
    lines = [f"┌─ {texts.CARD_TITLE} [{card.approval_id}] ─ {card.tool}", f"│ {card.summary}"]
    for field in card.fields:
        if field.multiline:
            lines.append(f"│   {field.label}:")
            lines += [f"│     {line}" for line in quoted(field.value).split("\n")]
        else:
            lines.append(f"│   {field.label}: {field.value}")
    lines += [f"│ ⚠ {w}" for w in card.warnings]
    lines += [f"│ • {p}" for p in card.preview]
    lines.append(f"│ {texts.CARD_WHY.format(reason=texts.localize(card.rule))}")
    lines.append(
        f"│ {texts.CARD_REQUESTED_BY.format(who=card.requester)} · {texts.CARD_EXPIRES.format(at=texts.when(card.expires_at))}"
    )
    if card.actionable:
        lines.append(f"└─ {texts.TERMINAL_CARD_HINT.format(approval_id=card.approval_id)}")
    else:
        lines += [f"│ {line}" for line in status_lines(card)]
        lines.append("└─")
    return "\n".join(lines)


@dataclass
class _Editing:
    """An `edit <id>` in progress: the form, and the values typed so far (Enter keeps a value)."""

    form: EditForm
    user: User
    values: dict[str, str] = dataclasses.field(default_factory=dict)
    index: int = 0


class TerminalAdapter:
    """A `Channel` on a text stream, plus the input loop."""

    platform = "terminal"

    def __init__(self, core: Core, *, out: TextIO | None = None, user: User | None = None, session: str | None = None) -> None:
        self.core = core
        self.out = out or sys.stdout
        name = getpass.getuser()
        self.user = user or User(platform="terminal", id=name, tenant="local", name=name)
        self.session = session or self.user.id
        self.quit = asyncio.Event()
        self._shown: dict[str, set[str]] = {}
        self._revisions: dict[str, int] = {}
        self._editing: _Editing | None = None

    @property
    def conversation_key(self) -> str:
        return f"terminal:{self.session}"

    def _print(self, text: str) -> None:
        # Everything printed is inert: a model's reply (or a name, a reason) carrying escape sequences
        # or carriage returns cannot move the cursor, turn off wrapping or draw a card of its own.
        self.out.write(inert(text) + "\n")
        self.out.flush()

    # ---- Channel ------------------------------------------------------
    async def post_reply(self, thread: Thread, text: str) -> None:
        self._print(f"bot> {text}")

    async def show_working(self, thread: Thread) -> None:
        self._print(f"bot> {texts.WORKING}")

    async def post_card(self, thread: Thread, card: CardView) -> str | None:
        self._print(render_card(card))
        return card.approval_id

    async def update_card(self, thread: Thread, message_id: str, card: CardView) -> None:
        if card.revision > self._revisions.get(card.approval_id, 1):
            self._revisions[card.approval_id] = card.revision
            self._print(render_card(card))  # an edited call: show the new version in full
        shown = self._shown.setdefault(card.approval_id, set())
        with i18n.speaking(card.lang, card.tz):
            lines = status_lines(card)
        for line in lines:
            if line not in shown:
                shown.add(line)
                self._print(f"bot> [{card.approval_id}] {line}")

    # ---- input --------------------------------------------------------
    async def handle_line(self, line: str) -> None:
        """One line typed by the user (an answer to the current edit prompt while editing)."""
        if self._editing is not None:
            await self._edit_answer(self._editing, line.rstrip("\r\n"))
            return
        line = line.strip()
        if not line:
            return
        word, _, rest = line.partition(" ")
        command = word.lower()
        user = language.speak_with(self.core.ctx.policy, self.user, None, text=line)
        if command == "edit":
            await self._edit_start(rest.strip(), user)
        elif command in ("approve", "reject"):
            approval_id, _, reason = rest.strip().partition(" ")
            if not approval_id:
                usage = f"{command} <id>{' [reason]' if command == 'reject' else ''}"
                self._print(f"bot> {texts.TERMINAL_USAGE.format(usage=usage)}")
                return
            outcome = await self.core.decide(
                DecisionRequest(approval_id=approval_id, user=user, approve=command == "approve", reason=reason.strip() or None)
            )
            self._print(f"bot> {outcome.message}")
        elif command == "/pending":
            await self.show_pending()
        elif (chat_command := commands.parse(line)) is not None:
            where = commands.Where("terminal", None, self.conversation_key)
            reply = await commands.run(self.core, chat_command, user, where)
            if chat_command == "help":
                self._print(str(texts.TERMINAL_HELP))
            self._print(f"bot> {reply.text}")
            for card in reply.cards:
                self._print(render_card(card))
        elif command == "/new":
            self.session = f"{self.user.id}-{uuid.uuid4().hex[:6]}"
            self._print(f"bot> {texts.TERMINAL_NEW}")
        elif command in ("/quit", "/exit"):
            self.quit.set()
        else:
            await self.send(line, user)

    # ---- edit <id> ------------------------------------------------------
    async def _edit_start(self, approval_id: str, user: User) -> None:
        if not approval_id:
            self._print(f"bot> {texts.TERMINAL_USAGE.format(usage='edit <id>')}")
            return
        outcome = await self.core.open_edit(EditRequest(approval_id, user))
        if outcome.form is None:
            self._print(f"bot> {outcome.message}")
            return
        self._editing = _Editing(outcome.form, user)
        with i18n.speaking(user.lang, user.tz):
            self._print(f"bot> {texts.TERMINAL_EDIT_START.format(approval_id=approval_id, tool=outcome.form.tool)}")
        self._prompt(self._editing)

    def _prompt(self, editing: _Editing) -> None:
        current = editing.form.fields[editing.index]
        kind = "|".join(current.options) if current.options else current.kind
        required = str(texts.TERMINAL_EDIT_REQUIRED) if current.required else ""
        with i18n.speaking(editing.user.lang, editing.user.tz):
            prompt = texts.TERMINAL_EDIT_PROMPT.format(
                field=current.name, kind=kind, required=required, value=one_line(current.value)
            )
        self._print(f"bot> {prompt}")

    async def _edit_answer(self, editing: _Editing, line: str) -> None:
        if line.strip():
            editing.values[editing.form.fields[editing.index].name] = line
        editing.index += 1
        if editing.index < len(editing.form.fields):
            self._prompt(editing)
            return
        self._editing = None
        form = editing.form
        outcome = await self.core.edit(EditRequest(form.approval_id, editing.user, form.revision, editing.values))
        self._print(f"bot> {outcome.message}")
        with i18n.speaking(editing.user.lang, editing.user.tz):
            for name, problem in (outcome.errors or {}).items():
                self._print(f"bot> {texts.TERMINAL_EDIT_PROBLEM.format(field=name or form.tool, problem=problem)}")
        if outcome.kind == EditResult.EDITED and outcome.card is not None:
            self._revisions[form.approval_id] = outcome.card.revision
            self._print(render_card(outcome.card))

    async def show_pending(self) -> None:
        """Show again, in full, every approval this user asked for that still waits for a decision."""
        pending = await self.core.pending_of(self.user)
        if not pending:
            self._print(f"bot> {texts.NOTHING_PENDING}")
        for approval in pending:
            self._print(render_card(card_view(approval)))

    async def send(self, text: str, user: User | None = None) -> None:
        msg_id = uuid.uuid4().hex
        msg = IncomingMessage(
            user=user or self.user,
            text=text,
            thread=Thread("terminal", {"session": self.session}),
            conversation_key=self.conversation_key,
            dedupe_keys=(f"terminal:{msg_id}",),
        )
        try:
            await self.core.accept_message(msg)
        except StorageError as exc:
            self._print(f"bot> {exc}")

    async def run(self, read_line: Callable[[], Awaitable[str]] | None = None) -> None:
        """Read lines until /quit or end of input, then let running work settle."""
        reader = read_line or _stdin_reader()
        self._print(texts.TERMINAL_WELCOME.format(who=self.user.label))
        await self.show_pending()
        while not self.quit.is_set():
            line = await reader()
            if line == "":
                break
            await self.handle_line(line)
        await self.core.ctx.tasks.idle()


def _stdin_reader() -> Callable[[], Awaitable[str]]:
    """Lines from stdin without blocking the event loop (pipes and TTYs; plain files read directly)."""
    stream = asyncio.StreamReader()
    mode: dict[str, str] = {}

    async def read() -> str:
        if "kind" not in mode:
            loop = asyncio.get_running_loop()
            try:
                await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), sys.stdin)
                mode["kind"] = "pipe"
            except (ValueError, OSError):
                mode["kind"] = "file"
        if mode["kind"] == "file":
            return sys.stdin.readline()
        return (await stream.readline()).decode("utf-8", errors="replace")

    return read
