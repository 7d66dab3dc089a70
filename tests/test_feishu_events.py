"""Feishu payloads -> `IncomingMessage` / `DecisionRequest` (`bot.feishu.events`)."""

from __future__ import annotations

import pytest

from bot.feishu.events import BadPayload, event_type, to_decision, to_message
from tests.fakes.feishu_api import BOT_OPEN_ID
from tests.feishu_helpers import ALICE, BOB, DM, GROUP, TENANT, at_bot, click, dm, message


def test_group_mention_becomes_a_message_in_a_new_thread():
    payload = at_bot("create a lead for Zhang San", message_id="om_1", event_id="evt-1")
    msg = to_message(payload, bot_open_id=BOT_OPEN_ID)
    assert msg is not None
    assert msg.text == "create a lead for Zhang San"
    assert msg.user.platform == "feishu" and msg.user.id == ALICE and msg.user.tenant == TENANT
    assert msg.thread.coords == {"chat_id": GROUP, "message_id": "om_1", "in_thread": True, "root_id": "om_1"}
    assert msg.conversation_key == f"feishu:{TENANT}:{GROUP}:om_1"
    assert msg.dedupe_keys == ("feishu:evt:evt-1", "feishu:msg:om_1")
    assert msg.channel_id == GROUP


def test_a_reply_in_the_thread_is_the_same_conversation():
    first = to_message(at_bot("start", message_id="om_1"), bot_open_id=BOT_OPEN_ID)
    later = to_message(at_bot("and more", message_id="om_9", root_id="om_1"), bot_open_id=BOT_OPEN_ID)
    assert first is not None and later is not None
    assert later.conversation_key == first.conversation_key
    assert later.thread.coords["message_id"] == "om_9" and later.thread.coords["in_thread"]


def test_group_message_mentioning_someone_else_is_ignored():
    payload = message("@_user_1 please look", mentions=[(BOB, "Bob")])
    assert to_message(payload, bot_open_id=BOT_OPEN_ID) is None


def test_at_all_does_not_count_as_mentioning_the_bot():
    assert to_message(message("@_all deploy please"), bot_open_id=BOT_OPEN_ID) is None


def test_unknown_bot_identity_never_matches_a_mention():
    assert to_message(at_bot("hello"), bot_open_id=None) is None


def test_mentions_are_stripped_or_made_readable_wherever_they_are():
    payload = message(
        "@_user_1 assign to @_user_2 and tell @_all, not @_user_3",
        mentions=[(BOB, "Bob Li"), (BOT_OPEN_ID, "chatops"), ("ou_x", "")],
    )
    msg = to_message(payload, bot_open_id=BOT_OPEN_ID)
    assert msg is not None
    assert msg.text == "@Bob Li assign to and tell @all, not @someone"


def test_dm_counts_without_a_mention_and_is_one_conversation():
    first = to_message(dm("hi", message_id="om_a"), bot_open_id=BOT_OPEN_ID)
    second = to_message(dm("again", message_id="om_b", root_id="om_a"), bot_open_id=BOT_OPEN_ID)
    assert first is not None and second is not None
    assert first.conversation_key == second.conversation_key == f"feishu:{TENANT}:{DM}"
    assert first.thread.coords == {"chat_id": DM, "message_id": "om_a", "in_thread": False}


def test_bot_senders_are_ignored():
    assert to_message(dm("loop?", sender_type="app"), bot_open_id=BOT_OPEN_ID) is None


def test_post_messages_are_flattened_with_mentions():
    content = {
        "title": "Lead",
        "content": [
            [{"tag": "at", "user_id": "@_user_1", "user_name": "chatops"}, {"tag": "text", "text": " create a lead"}],
            [{"tag": "a", "text": "site", "href": "https://example.com"}, {"tag": "img", "image_key": "img_1"}],
        ],
    }
    payload = message("", msg_type="post", content=content, mentions=[(BOT_OPEN_ID, "chatops")])
    msg = to_message(payload, bot_open_id=BOT_OPEN_ID)
    assert msg is not None and msg.text == "Lead\ncreate a lead\nsite"


def test_other_message_types_arrive_empty():
    msg = to_message(dm("", msg_type="image", content={"image_key": "img_1"}), bot_open_id=BOT_OPEN_ID)
    assert msg is not None and msg.text == ""


@pytest.mark.parametrize("breaks", ["no_sender", "no_message_id", "no_chat", "bad_content"])
def test_unusable_message_events_raise_bad_payload(breaks):
    payload = dm("x")
    event = payload["event"]
    if breaks == "no_sender":
        event["sender"]["sender_id"] = {}
    elif breaks == "no_message_id":
        del event["message"]["message_id"]
    elif breaks == "no_chat":
        event["message"]["chat_id"] = 5
    else:
        event["message"]["content"] = "{not json"
    with pytest.raises(BadPayload):
        to_message(payload, bot_open_id=BOT_OPEN_ID)


def test_click_becomes_a_decision_with_the_form_reason():
    request = to_decision(click("ap-abc", "reject", operator=BOB, reason="  wrong customer  "))
    assert request.approval_id == "ap-abc" and not request.approve
    assert request.user.id == BOB and request.user.tenant == TENANT
    assert request.reason == "wrong customer"
    approve = to_decision(click("ap-abc", "approve", reason="ignored"))
    assert approve.approve and approve.reason is None


def test_legacy_card_frame_shape_is_understood():
    legacy = {
        "open_id": ALICE,
        "tenant_key": TENANT,
        "open_message_id": "om_card",
        "action": {"value": {"action": "approve", "approval_id": "ap-1"}, "tag": "button"},
    }
    assert event_type(legacy) is None
    request = to_decision(legacy)
    assert request.approve and request.user.id == ALICE and request.user.tenant == TENANT


@pytest.mark.parametrize(
    "value",
    [{}, {"action": "approve"}, {"action": "delete", "approval_id": "ap-1"}, {"action": "approve", "approval_id": "x" * 65}],
)
def test_unusable_clicks_raise_bad_payload(value):
    payload = click("ap-1")
    payload["event"]["action"]["value"] = value
    with pytest.raises(BadPayload):
        to_decision(payload)
