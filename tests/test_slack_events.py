"""Slack payload -> our event types: which events are messages for the bot, where answers go, dedupe keys."""

from __future__ import annotations

import json

import pytest

from bot.slack import events
from bot.slack.events import Author
from tests.fakes.slack_api import BOT_USER_ID, TEAM_ID
from tests.slack_helpers import ALICE, BOB, CHANNEL, DM, dm, mention


def translate(body: dict, author: Author | None = None):
    return events.message_from_event(body, body["event"], BOT_USER_ID, author)


def test_a_channel_mention_is_a_thread_conversation_answered_in_that_thread():
    body = mention("create a lead  for <@U0OTHER>", ts="1.000100", event_id="Ev1")
    msg = translate(body, Author(name="Alice"))
    assert msg is not None
    assert msg.text == "create a lead for <@U0OTHER>"  # only the bot's own mention is removed
    assert (msg.user.platform, msg.user.id, msg.user.tenant, msg.user.name) == ("slack", ALICE, TEAM_ID, "Alice")
    assert msg.user.key == f"slack:{TEAM_ID}:{ALICE}"
    assert msg.thread.coords == {
        "team": TEAM_ID,
        "channel": CHANNEL,
        "thread_ts": "1.000100",
        "ts": "1.000100",
        "dm": False,
        "user": ALICE,
    }
    assert msg.conversation_key == f"slack:{TEAM_ID}:{CHANNEL}:1.000100"
    assert msg.dedupe_keys == ("slack:evt:Ev1", f"slack:msg:{TEAM_ID}:{CHANNEL}:1.000100")
    assert msg.channel_id == CHANNEL
    json.dumps(msg.to_dict())  # stored as JSON


def test_a_mention_inside_a_thread_joins_the_thread():
    msg = translate(mention("and again", ts="2.0", thread_ts="1.0"))
    assert msg is not None
    assert msg.thread.coords["thread_ts"] == "1.0" and msg.thread.coords["ts"] == "2.0"
    assert msg.conversation_key.endswith(":1.0")


def test_top_level_dms_share_one_conversation_and_dm_threads_are_their_own():
    first, second = translate(dm("a", ts="1.0")), translate(dm("b", ts="2.0"))
    threaded = translate(dm("c", ts="3.0", thread_ts="1.0"))
    assert first and second and threaded
    assert first.conversation_key == second.conversation_key == f"slack:{TEAM_ID}:{DM}"
    assert first.thread.coords["thread_ts"] is None  # answered top-level in the DM
    assert threaded.conversation_key == f"slack:{TEAM_ID}:{DM}:1.0"
    assert threaded.thread.coords["thread_ts"] == "1.0"


@pytest.mark.parametrize(
    "body",
    [
        dm("bot", bot_id="B0OTHER", subtype="bot_message"),
        dm("bot without subtype", bot_id="B0OTHER"),
        dm("me", user=BOT_USER_ID),
        dm("edit", subtype="message_changed"),
        dm("joined", subtype="channel_join"),
        dm("channel chatter", channel=CHANNEL, channel_type="channel"),
        dm("no user", user=""),
    ],
    ids=["bot_message", "bot_id", "own message", "edit", "join", "channel message", "no user"],
)
def test_events_not_for_the_bot_are_ignored(body):
    assert translate(body) is None


def test_human_subtypes_and_mention_formats_are_kept():
    assert translate(dm("see file", subtype="file_share")) is not None
    assert events.strip_mention(f"<@{BOT_USER_ID}|chatops> hi <@{BOT_USER_ID}>", BOT_USER_ID) == "hi"
    assert events.strip_mention("  <@U0BOT>  ", BOT_USER_ID) == ""


def test_slack_connect_users_keep_their_own_team():
    body = mention("hi")
    body["event"]["user_team"] = "T0PARTNER"
    msg = translate(body)
    assert msg is not None and msg.user.tenant == "T0PARTNER"
    assert msg.dedupe_keys[-1].startswith(f"slack:msg:{TEAM_ID}:")  # the place is still this workspace's


def test_a_bot_author_found_by_users_info_is_marked():
    msg = translate(dm("hi"), Author(name="deploybot", is_bot=True))
    assert msg is not None and msg.user.is_bot


def test_an_approve_click_carries_the_approval_id_and_the_clicker_identity():
    body = {
        "type": "block_actions",
        "team": {"id": TEAM_ID},
        "user": {"id": BOB, "name": "bob", "team_id": TEAM_ID},
        "channel": {"id": CHANNEL},
        "message": {"ts": "5.0", "thread_ts": "1.0"},
    }
    request = events.decision_from_action(body, {"action_id": events.APPROVE_ACTION, "value": "ap-123"})
    assert (request.approval_id, request.approve, request.reason) == ("ap-123", True, None)
    assert request.user.key == f"slack:{TEAM_ID}:{BOB}" and request.user.name == "bob" and not request.user.is_bot
    assert events.click_place(body) == {"channel": CHANNEL, "thread_ts": "1.0"}


def test_a_submitted_reject_modal_carries_the_reason_and_the_place():
    meta = {"approval_id": "ap-9", "channel": CHANNEL, "thread_ts": "1.0"}
    body = {
        "type": "view_submission",
        "user": {"id": ALICE, "team_id": TEAM_ID},
        "view": {
            "private_metadata": json.dumps(meta),
            "state": {"values": {"reason": {"reason": {"type": "plain_text_input", "value": "  too risky "}}}},
        },
    }
    request, place = events.decision_from_view(body)
    assert (request.approval_id, request.approve, request.reason) == ("ap-9", False, "too risky")
    assert place == meta
    body["view"]["state"]["values"]["reason"]["reason"]["value"] = None
    assert events.decision_from_view(body)[0].reason is None
    body["view"]["private_metadata"] = "not json"
    assert events.decision_from_view(body)[0].approval_id == ""
