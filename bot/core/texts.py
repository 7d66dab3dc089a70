"""Every sentence the bot writes, in one place, in English (the gettext source). Adapters and the
core format these; none invent their own.

Each UPPERCASE constant becomes an `i18n.Text` at import: `texts.NAME` and
`texts.NAME.format(...)` render in the current language (`i18n.speak`). The translations are in
`locales/<lang>/LC_MESSAGES/chatops.po` (msgctxt = the constant's name); `tests/test_i18n.py`
checks that both catalogues hold every constant with the same placeholders. The tools' own card
lines are declared beside their tools (`tools.phrases`, which cannot import this) and translated in
the same catalogues (msgctxt `tool:<key>`, rendered by `i18n.localised`).
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import cache

from bot.core import i18n
from tools import phrases

WORKING = "On it…"
MODEL_FAILED = "Sorry, the language model is not answering right now, so I did nothing. Please try again in a minute."
MODEL_BAD_RESPONSE = "Sorry, the language model sent a reply I could not use, so I did nothing. Please try again."
MAX_STEPS = "I stopped after {steps} steps without finishing. Nothing else will run; tell me how to continue."
INTERNAL_ERROR = "Sorry, something went wrong on my side and I stopped. Nothing was run without approval. (ref {ref})"
NOT_ALLOWED_TO_USE = "Sorry, you cannot use chatops here: {reason}."
RATE_LIMITED = "You are sending requests faster than allowed ({limit} per minute). Please wait a moment."
TOO_MANY_PENDING = "You already have {count} approvals waiting. Decide or let them expire before asking for more."
EMPTY_MESSAGE = "Hi! Tell me what to do, e.g. “create a lead for Zhang San, zhangsan@example.com”."

# Approval decisions (ephemeral messages, toasts, terminal lines)
DECIDED_APPROVED = "Approved. Running {tool} now."
DECIDED_REJECTED = "Rejected. I told the assistant."
VOTE_RECORDED = "Your approval is recorded; {remaining} more approval(s) needed."
ALREADY_DECIDED = "This request was already {status} by {who}."
ALREADY_FINISHED = "This request is already {status}."
EXPIRED = "This request expired at {at}; nothing was run."
NOT_FOUND = "I do not know approval {approval_id}."
NOT_ALLOWED = "You cannot decide this request: {reason}."
SAME_APPROVER_TWICE = "You have already approved this request; another approver is needed."
REQUESTER_CANNOT_APPROVE = "the person who asked cannot approve their own request"
CLICK_STILL_WORKING = "Your click arrived and is still being handled: the card will show the outcome. No need to click again."
CLICK_NOT_RECORDED = "I could not record your click just now (the database did not answer in time), so nothing changed and nothing ran. Please click again."
STALE_CARD = "This card shows an older version of the request (it was edited since). Use the updated card."

# Edit before approve (the Edit button, its form, and the answers to a submitted edit)
EDIT = "Edit"
EDIT_TITLE = "Edit request"
EDIT_SAVE = "Save"
EDIT_CANCEL = "Cancel"
EDIT_HINT = "Change the values, then save. The request is checked again and earlier approvals start over."
EDIT_KEPT = "{field}: too long to edit here; it is kept as it is."
EDIT_YES = "Yes"
EDIT_NO = "No"
EDITED = "Edited. Earlier approvals were reset; the card shows the new version."
EDITED_ESCALATED = "Edited. The new values need a stricter rule ({rule}); earlier approvals were reset."
EDIT_UNCHANGED = "Nothing was changed."
EDIT_INVALID_FORM = "Some values are not valid; nothing was changed."
EDIT_DENIED = "The policy denies the call with these values ({reason}); nothing was changed."
EDIT_DECIDED = "This request is already {status}; it can no longer be edited."
EDIT_TOOL_GONE = "The tool {tool} is no longer available, so this request cannot be edited."
EDIT_NOT_ALLOWED = "You cannot edit this request: {reason}."
EDIT_REQUIRED = "a value is required"
EDIT_NOT_INTEGER = "must be a whole number"
EDIT_NOT_NUMBER = "must be a number"
EDIT_NOT_BOOLEAN = "must be true or false"
EDIT_NOT_OPTION = "must be one of: {options}"
EDIT_NOT_JSON = "must be valid JSON"
EDIT_INVALID = "not valid: {problem}"
EDITOR_CANNOT_APPROVE = "whoever edited the request cannot approve it"
ONLY_REQUESTER_OR_APPROVER_EDITS = "only {who}, who asked, or a listed approver, can edit it"
CARD_EDITED = "Edited by {who} (version {revision}); earlier approvals were reset."
MODEL_EDITED = "Note: {who} edited the arguments of this call before it was decided. The final arguments were: {args}"

# What the model reads as the result of a call that did not run
MODEL_REJECTED = "Rejected by {who}: {reason}"
MODEL_REJECTED_NO_REASON = "Rejected by {who} (no reason given)."
MODEL_EXPIRED = "Not run: the approval expired without a decision."
MODEL_CANCELLED = "Not run: cancelled ({reason})."
MODEL_DENIED = "Not run: denied by policy ({reason})."
MODEL_IN_DOUBT = "Outcome unknown: {detail}. It was not retried; a human must check before trying again."
MODEL_FAILED_TOOL = "Failed: {detail}"

# Card labels
CARD_TITLE = "Approval needed"
CARD_REQUESTED_BY = "Requested by {who}"
CARD_EXPIRES = "Expires {at}"
CARD_WHY = "Why approval: {reason}"
CARD_APPROVED = "Approved by {who} at {at}"
CARD_REJECTED = "Rejected by {who}: {reason}"
CARD_REJECTED_NO_REASON = "Rejected by {who}"
CARD_EXPIRED = "Expired at {at}: nothing was run"
CARD_CANCELLED = "Cancelled: {reason}"
CARD_EXECUTING = "Running…"
CARD_VOTE_RECORDED = "One approval is recorded; {remaining} more approval(s) needed."
CARD_SUCCEEDED = "Done: {detail}"
CARD_FAILED = "Failed: {detail}"
CARD_IN_DOUBT = "Outcome unknown: {detail}. Not retried; please check by hand."
# Why a call ended as it did, stored in English (the model reads them) and shown translated on the card
OUTCOME_NO_ANSWER = "no answer within {seconds}s"
OUTCOME_CRASHED = "the tool crashed ({error})"
OUTCOME_EXECUTOR_LOST = "the process running it stopped answering before it finished"
PREVIEW_CHANGED = "what it would do changed after the card was shown; it now says: {now}"
PREVIEW_UNCHECKED = "what it would do could not be checked again ({error})"
CARD_TRUNCATED = "… [cut: {more} more characters]"
CARD_SHORTENED = "… [{more} more characters in the full request]"
CARD_WARN_BIDI = "{field} contains text-direction controls ({codes}), shown as ⟨U+…⟩: elsewhere it may read differently"
CARD_WARN_INVISIBLE = "{field} contains invisible characters ({codes}), shown as ⟨U+…⟩"
CARD_WARN_BLANKS = "{field} contains long runs of blank space, shown as ⟨N spaces⟩ / ⟨N line breaks⟩: read past them"
CARD_WARN_NEWLINES = "{field} contains line breaks, shown as ⏎"
CARD_WARN_DOMAIN = "{field}: {detail}"
CARD_MORE_WARNINGS = (
    "{count} more warning(s) like these about other arguments: the ⟨…⟩ markers in their values show what was neutralised"
)
CARD_FULL_SLACK = "Some values are shortened here: “View full request” shows everything that will run."
CARD_FULL_FEISHU = "Some values are shortened here: open “Full request” below to see everything that will run."
CARD_MORE_FIELDS = "{count} more argument(s) in the full request"
CARD_MORE_LINES = "… {count} more line(s) not kept with this card"
PREVIEW_UNAVAILABLE = "(preview unavailable: {error})"
FULL_REQUEST = "View full request"
FULL_TITLE = "Full request"
FULL_PANEL = "Full request ({chars} characters)"
FULL_TOO_LONG = (
    "{more} more characters of this request do not fit here. Do not approve what you cannot see: "
    "an operator can print it in full with `chatops approval show {approval_id}`."
)
FULL_NOT_FOUND = "I cannot show approval {approval_id} here."
APPROVE = "Approve"
REJECT = "Reject"
REJECT_REASON_PROMPT = "Why are you rejecting this? (the assistant will read it)"

MODEL_SLOW = "Still waiting for the language model… I will answer here as soon as it replies."

# The run's progress message (edited in place, then replaced by the answer, or kept above the cards)
PROGRESS_SEARCHING_CRM = "Searching the CRM…"
PROGRESS_RUNNING = "Running {tool}…"
PROGRESS_WAITING = "Asked for approval of {count} action(s): see the card(s) below."
PROGRESS_CONTINUING = "Decided; working on the result…"
PROGRESS_STOPPED = "Stopped."
EXPIRY_REMINDER = "⏰ Approval {approval_id} ({tool}: {summary}) expires at {at}. Decide it before then, or nothing will run."

# The Slack App Home tab
HOME_PENDING = "Waiting for a decision ({count})"
HOME_PENDING_NONE = "Nothing is waiting for you."
HOME_PENDING_MORE = "{count} more waiting: see their cards, or /chatops pending."
HOME_SHORTENED = "Some values are shortened here: decide on its card, where “View full request” shows everything that will run."
HOME_ROLE = "You are the {role} · expires {at}"
HOME_RECENT = "Your recent requests"
HOME_RECENT_NONE = "No requests yet. Mention me in a channel or write to me here."
HOME_RUN = "{at} · {status} · {asked}"
RUN_RUNNING = "working"
RUN_WAITING = "waiting for approval"
RUN_DONE = "done"
RUN_FAILED = "failed"
RUN_CANCELLED = "cancelled"
WAITING_FOR_OTHERS = "Your message will be handled once the pending approval(s) in this thread are decided."
CARD_UNDELIVERED = "the approval card could not be delivered to the chat"
CARD_UNDELIVERED_NOTICE = "I could not show the approval card for {tool} in this chat, so it was cancelled and nothing was run."
IN_DOUBT_RESOLVED = "Update on {tool} (approval {approval_id}): it finished after all — {status}."
NOTHING_PENDING = "Nothing of yours is waiting for a decision."
SUPERSEDED = "a newer message arrived in this conversation"
IN_DOUBT_REPORT = "⚠️ {tool} (approval {approval_id}) was interrupted while running; its outcome is unknown and it was NOT retried. Please check by hand."


# Policy: why someone may not use the bot or decide, and why a call needs approval
BOTS_CANNOT_USE = "bots cannot use chatops"
TENANT_NOT_ALLOWED = "your workspace or tenant is not allowed"
USER_DENIED = "you are not allowed to use chatops"
USER_NOT_LISTED = "you are not on the list of chatops users"
CHANNEL_NOT_ENABLED = "chatops is not enabled in this channel"
RISK_DESTRUCTIVE = "destructive tool"
RISK_EXTERNAL_RECIPIENTS = "external recipients: {addresses}"
RULE_READ_ONLY = "read-only tool"
RULE_WRITE_DEFAULT = "write tool: the requester confirms"
RULE_FROM_POLICY = "policy rule for '{match}': {rule}"
RULE_AUTO_WRITE = "policy says auto for '{match}', but it is a write tool (set force = true)"
RULE_RECIPIENTS = "recipients outside {domains}"
BOTS_CANNOT_DECIDE = "bots cannot decide approvals"
OTHER_TENANT = "you belong to another workspace or tenant"
ACTION_DENIED = "this action is denied by policy"
ONLY_REQUESTER = "only {who}, who asked, can decide this"
ONLY_REQUESTER_OR_APPROVER = "only {who}, who asked, or a listed approver, can decide this"
NO_APPROVERS = "no approvers are configured for this action"
NOT_AN_APPROVER = "you are not a listed approver for this action"
NOW_DENIED = "this action is now denied by policy"
APPROVER_REVOKED = "{who} may no longer approve this action"
SOMEONE = "someone"

# Per-channel setup
TOOL_NOT_HERE = "The tool {tool} is not available in this channel. Available here: {available}."

# In-chat commands (help / pending / cancel; the Slack /chatops command; the Feishu bot menu)
HELP_TITLE = "What I can do here (write actions wait for an approval):"
HELP_LINE = "• {tool} — {description} ({rule})"
HELP_NO_TOOLS = "No tools are enabled in this channel."
HELP_COMMANDS = "Commands: help, pending, cancel (also /chatops help | pending | cancel)."
RULE_AUTO = "runs at once"
RULE_CONFIRM = "you confirm"
RULE_APPROVE = "needs a listed approver"
RULE_TWO_PERSON = "needs two approvers"
RULE_DENY = "not allowed"
PENDING_TITLE = "Waiting for a decision ({count}):"
PENDING_NONE = "Nothing is waiting for you."
PENDING_LINE = "• {approval_id} {tool}: {summary} (you are the {role}; expires {at})"
ROLE_REQUESTER = "requester"
ROLE_APPROVER = "approver"
CANCELLED_REASON = "cancelled by {who}"
CANCEL_DONE = "Stopped. {count} pending approval(s) cancelled; nothing else will run for this request."
CANCEL_NOTHING = "There is nothing to cancel in this conversation."
COMMAND_UNKNOWN = "Unknown command “{command}”. Try: help, pending, cancel."
MENU_NO_CONVERSATION = "Cancel works inside a conversation: write “cancel” in the thread you want to stop."

# The terminal
TERMINAL_HELP = """Type a request for the bot, or:
  approve <id>            approve a pending action
  reject <id> [reason]    reject it (the reason goes to the assistant)
  edit <id>               change its arguments first (asks for each one)
  help | pending | cancel what the bot can do, what waits for you, stop this conversation
  /new                    start a new conversation
  /quit                   leave (Ctrl-D also works)"""
TERMINAL_WELCOME = "chatops terminal: you are {who}. Type help for commands."
TERMINAL_USAGE = "usage: {usage}"
TERMINAL_NEW = "new conversation started"
TERMINAL_CARD_HINT = "type: approve {approval_id}   or   reject {approval_id} <reason>   or   edit {approval_id}"
TERMINAL_EDIT_START = "Editing {approval_id} ({tool}): type a new value for each argument, or just press Enter to keep it."
TERMINAL_EDIT_PROMPT = "{field} ({kind}{required}) [{value}]:"
TERMINAL_EDIT_REQUIRED = ", required"
TERMINAL_EDIT_PROBLEM = "{field}: {problem}"


def when(at: datetime) -> str:
    """A timestamp as the reader reads it (their language and time zone; UTC when unknown)."""
    return i18n.when(at)


def english(text: str) -> str:
    """The English source of one of our sentences (a constant here is an `i18n.Text` at run time; the type
    checker sees the `str` it is declared as)."""
    return text.source if isinstance(text, i18n.Text) else text


def _register() -> None:
    """Turn every UPPERCASE sentence of this module into an `i18n.Text` keyed by its name."""
    for name, value in list(globals().items()):
        if name.isupper() and isinstance(value, str):
            globals()[name] = i18n.Text(name, value)


def all_texts() -> dict[str, i18n.Text]:
    """Every sentence, by constant name (the catalogues' msgctxt)."""
    return {k: v for k, v in globals().items() if isinstance(v, i18n.Text)}


RECOGNISED_LETTERS = 8  # a stored sentence with placeholders is recognised by at least this many letters of its own


@cache
def _patterns(_sentences: int) -> list[tuple[i18n.Text | phrases.Sentence, re.Pattern[str]]]:
    """Each of our sentences and the tools' as a pattern (placeholders capture), the longest (most
    specific) first. `_sentences`: how many tool sentences are declared (toolsets imported later add more)."""
    ours: list[tuple[i18n.Text | phrases.Sentence, str]] = [(text, text.source) for text in all_texts().values()]
    ours += [(sentence, sentence.english) for sentence in phrases.all_sentences().values()]
    found = []
    for sentence, source in sorted(ours, key=lambda pair: -len(pair[1])):
        if "{" in source and len(re.sub(r"\{\w+\}|[\W\d_]", "", source)) < RECOGNISED_LETTERS:
            continue  # "{field}: {detail}" would match anything with a colon in it
        regex, seen = "", set()
        for i, part in enumerate(re.split(r"\{(\w+)\}", source)):
            if i % 2 == 0:
                regex += re.escape(part)
            else:
                regex += f"(?P={part})" if part in seen else f"(?P<{part}>.+?)"
                seen.add(part)
        found.append((sentence, re.compile(f"^{regex}$", re.DOTALL)))
    return found


def localize(stored: str | None) -> str | None:
    """A sentence stored in English by code (a cancel reason, a rule, a tool's result or failure, see
    `tools.phrases`) rendered in the current language when it is one of ours, its values too; anything
    else (what people typed, what an MCP server said) unchanged."""
    if not stored or i18n.current() == i18n.DEFAULT_LANGUAGE:
        return stored
    for sentence, pattern in _patterns(len(phrases.all_sentences())):
        if (match := pattern.match(stored)) is None:
            continue
        values = {name: localize(value) if value != stored else value for name, value in match.groupdict().items()}
        if isinstance(sentence, i18n.Text):
            return sentence.format(**values)
        return i18n.localised(sentence(**values))
    return stored


_register()
