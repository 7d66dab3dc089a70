"""Every sentence a user reads, in one place. Adapters and the core format these; none invent their own."""

from __future__ import annotations

from datetime import datetime

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
CARD_SUCCEEDED = "Done: {detail}"
CARD_FAILED = "Failed: {detail}"
CARD_IN_DOUBT = "Outcome unknown: {detail}. Not retried; please check by hand."
CARD_TRUNCATED = "… [cut: {more} more characters]"
CARD_SHORTENED = "… [{more} more characters in the full request]"
CARD_WARN_BIDI = "{field} contains text-direction controls ({codes}), shown as ⟨U+…⟩: elsewhere it may read differently"
CARD_WARN_INVISIBLE = "{field} contains invisible characters ({codes}), shown as ⟨U+…⟩"
CARD_WARN_BLANKS = "{field} contains long runs of blank space, shown as ⟨N spaces⟩ / ⟨N line breaks⟩: read past them"
CARD_WARN_NEWLINES = "{field} contains line breaks, shown as ⏎"
CARD_WARN_DOMAIN = "{field}: {detail}"
CARD_FULL_SLACK = "Some values are shortened here: “View full request” shows everything that will run."
CARD_FULL_FEISHU = "Some values are shortened here: open “Full request” below to see everything that will run."
CARD_MORE_FIELDS = "{count} more argument(s) in the full request"
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
WAITING_FOR_OTHERS = "Your message will be handled once the pending approval(s) in this thread are decided."
CARD_UNDELIVERED = "the approval card could not be delivered to the chat"
CARD_UNDELIVERED_NOTICE = "I could not show the approval card for {tool} in this chat, so it was cancelled and nothing was run."
IN_DOUBT_RESOLVED = "Update on {tool} (approval {approval_id}): it finished after all — {status}."
NOTHING_PENDING = "Nothing of yours is waiting for a decision."
SUPERSEDED = "a newer message arrived in this conversation"
IN_DOUBT_REPORT = "⚠️ {tool} (approval {approval_id}) was interrupted while running; its outcome is unknown and it was NOT retried. Please check by hand."


def when(at: datetime) -> str:
    """A timestamp as users read it (UTC, minutes)."""
    return at.strftime("%Y-%m-%d %H:%M UTC")
