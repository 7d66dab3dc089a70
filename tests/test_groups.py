"""Group memberships for the policy's group entries: which groups the policy names, the cache, and
the Slack (`usergroups.users.list`) and Feishu (contact user, chat members) resolvers against the
fakes. The adapter-level matrix is in `test_authz_adapters.py`."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from bot.core.memberships import MembershipCache
from bot.core.policy_file import ReloadingPolicy, parse_policy
from bot.feishu.client import FeishuApi
from bot.feishu.groups import FeishuGroups
from bot.slack.groups import SlackGroups
from tests.fakes.feishu_api import FakeFeishu
from tests.slack_helpers import fake_slack_fixture  # noqa: F401 - fixtures
from tests.test_slack_client import client_for

POLICY = """
[access]
users = ["everyone"]
deny_users = ["slack-group:S0INTERNS"]

[groups]
everyone = ["slack:U1", "slack-group:S0STAFF", "feishu-group:oc_staff"]
leads = ["slack:U0LEAD", "slack-group:S0LEADS", "feishu-dept:od-leads", "feishu:ou_lead"]

[[tools]]
match = "write_*"
rule = "approve"
approvers = ["leads", "feishu-group:oc_ops"]
"""

log = logging.getLogger("test.groups")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_group_refs_are_the_platforms_group_entries_named_anywhere_with_group_names_expanded():
    policy = parse_policy(POLICY, "policy.toml")
    assert policy.group_refs("slack") == {"slack-group:S0STAFF", "slack-group:S0INTERNS", "slack-group:S0LEADS"}
    assert policy.group_refs("feishu") == {"feishu-group:oc_staff", "feishu-dept:od-leads", "feishu-group:oc_ops"}
    assert policy.group_refs("terminal") == frozenset()
    assert parse_policy("", "empty.toml").group_refs("slack") == frozenset()  # no group named: nothing is ever asked


def test_a_deny_list_group_name_is_expanded_like_the_others():
    from bot.core.events import User

    policy = parse_policy('[groups]\ninterns = ["slack:U0INTERN"]\n[access]\ndeny_users = ["interns"]\n', "p.toml")
    assert not policy.may_use(User("slack", "U0INTERN", "T1"), None).allowed
    assert policy.may_use(User("slack", "U0OTHER", "T1"), None).allowed


def test_the_reloading_policy_reports_the_current_files_groups(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY, encoding="utf-8")
    policy = ReloadingPolicy(path)
    assert "slack-group:S0LEADS" in policy.group_refs("slack")
    path.write_text(POLICY.replace('"slack-group:S0LEADS", ', "") + "\n# edited\n", encoding="utf-8")
    assert "slack-group:S0LEADS" not in policy.group_refs("slack")


# ---------------------------------------------------------------------- the cache
async def test_the_cache_fetches_once_per_ttl_and_concurrent_askers_share_the_fetch():
    clock, asked = Clock(), []
    gate = asyncio.Event()

    async def fetch(key: str) -> frozenset[str]:
        asked.append(key)
        await gate.wait()
        return frozenset({"U1"})

    cache = MembershipCache("group", fetch, log=log, ttl=60, clock=clock)
    waiting = [asyncio.create_task(cache.get("S1", 5)) for _ in range(3)]
    await asyncio.sleep(0)  # let the three askers start (no time passes)
    gate.set()
    assert await asyncio.gather(*waiting) == [frozenset({"U1"})] * 3
    assert asked == ["S1"]
    clock.now += 59
    assert await cache.get("S1", 5) == {"U1"} and asked == ["S1"]
    clock.now += 2  # 61 s after the fetch was asked for
    assert await cache.get("S1", 5) == {"U1"} and asked == ["S1", "S1"]


async def test_a_failed_fetch_is_unknown_logged_and_asked_again_only_after_a_pause(caplog):
    clock, calls = Clock(), []

    async def fetch(key: str) -> frozenset[str]:
        calls.append(key)
        if len(calls) == 1:
            raise ConnectionError("down")
        return frozenset({"U1"})

    cache = MembershipCache("slack user group", fetch, log=log, retry_after=5, clock=clock)
    assert await cache.get("S1", 1) is None
    assert "slack user group S1 could not be read (ConnectionError); treating the user as not a member" in caplog.text
    clock.now += 4
    assert await cache.get("S1", 1) is None and calls == ["S1"]  # no call (and no warning) per click meanwhile
    clock.now += 2
    assert await cache.get("S1", 1) == {"U1"} and calls == ["S1", "S1"]  # a failure is never cached as "no"


async def test_a_slow_fetch_answers_unknown_within_the_budget_and_still_fills_the_cache(caplog):
    gate = asyncio.Event()

    async def fetch(key: str) -> frozenset[str]:
        await gate.wait()
        return frozenset({"U1"})

    cache = MembershipCache("group", fetch, log=log)
    assert await cache.get("S1", 0.05) is None
    assert "no answer within 0.05s" in caplog.text
    gate.set()
    assert await cache.get("S1", 5) == {"U1"}  # the same fetch finished and answered the next click
    await cache.close()


async def test_close_cancels_fetches_still_running():
    async def fetch(key: str) -> frozenset[str]:
        await asyncio.Event().wait()
        return frozenset()

    cache = MembershipCache("group", fetch, log=log)
    assert await cache.get("S1", 0.01) is None
    await cache.close()
    assert cache._pending == {}


# ---------------------------------------------------------------------- Slack
async def test_slack_asks_nothing_when_the_policy_names_no_slack_group(fake_slack):
    groups = SlackGroups(client_for(fake_slack), lambda: frozenset({"feishu-dept:od-1"}))
    assert await groups.groups_of("U1") == ()
    assert fake_slack.calls == []


async def test_slack_memberships_come_from_usergroups_users_list_and_are_cached(fake_slack):
    clock = Clock()
    fake_slack.set_usergroup("S0LEADS", ["U0LEAD", "U0OTHERLEAD"])
    fake_slack.set_usergroup("S0STAFF", ["U0LEAD"])
    refs = frozenset({"slack-group:S0LEADS", "slack-group:S0STAFF", "feishu-group:oc_1"})
    groups = SlackGroups(client_for(fake_slack), lambda: refs, clock=clock)
    assert await groups.groups_of("U0LEAD") == ("slack-group:S0LEADS", "slack-group:S0STAFF")
    assert await groups.groups_of("U0OTHERLEAD") == ("slack-group:S0LEADS",)
    assert await groups.groups_of("U0NOBODY") == ()
    calls = fake_slack.calls_to("usergroups.users.list")
    assert sorted(c.params["usergroup"] for c in calls) == ["S0LEADS", "S0STAFF"]  # once per group
    fake_slack.set_usergroup("S0LEADS", ["U0OTHERLEAD"])  # removed from the group in Slack...
    assert await groups.groups_of("U0LEAD") == ("slack-group:S0LEADS", "slack-group:S0STAFF")  # ...cached for now
    clock.now += 61
    assert await groups.groups_of("U0LEAD") == ("slack-group:S0STAFF",)  # ...and gone after a minute


async def test_slack_a_group_that_cannot_be_read_counts_as_not_a_member(fake_slack, caplog):
    fake_slack.set_usergroup("S0LEADS", ["U0LEAD"])
    fake_slack.fail("usergroups.users.list", "missing_scope")
    clock = Clock()
    groups = SlackGroups(client_for(fake_slack), lambda: frozenset({"slack-group:S0LEADS"}), clock=clock)
    assert await groups.groups_of("U0LEAD") == ()
    assert "slack user group S0LEADS could not be read (Slack answered missing_scope)" in caplog.text
    clock.now += 6
    assert await groups.groups_of("U0LEAD") == ("slack-group:S0LEADS",)  # asked again, not cached as "no"
    gone = SlackGroups(client_for(fake_slack), lambda: frozenset({"slack-group:S0GONE"}))
    assert await gone.groups_of("U0LEAD") == ()
    assert "slack user group S0GONE could not be read (Slack answered no_such_subteam)" in caplog.text


async def test_slack_a_rate_limited_group_is_answered_within_the_budget(fake_slack):
    fake_slack.set_usergroup("S0LEADS", ["U0LEAD"])
    fake_slack.rate_limit("usergroups.users.list", times=1, retry_after=2)
    groups = SlackGroups(client_for(fake_slack), lambda: frozenset({"slack-group:S0LEADS"}), budget=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await groups.groups_of("U0LEAD") == ()
    assert loop.time() - started < 1.0
    await groups.close()


# ---------------------------------------------------------------------- Feishu
@pytest.fixture
async def fake():
    server = await FakeFeishu().start()
    yield server
    await server.stop()


@pytest.fixture
async def api(fake):
    client = FeishuApi(app_id=f"cli_{uuid.uuid4().hex[:10]}", app_secret="secret", domain=fake.url, timeout=2.0)
    await client.open()
    return client


async def test_feishu_asks_nothing_when_the_policy_names_no_department_or_chat(api, fake):
    groups = FeishuGroups(api, lambda: frozenset({"slack-group:S1"}))
    assert await groups.groups_of("ou_lead") == ()
    assert fake.calls == []


async def test_feishu_departments_come_from_the_users_record(api, fake):
    fake.set_departments("ou_lead", ["od-leads", "od-sales"])
    fake.set_departments("ou_other", ["od-sales"])
    groups = FeishuGroups(api, lambda: frozenset({"feishu-dept:od-leads", "feishu-dept:od-finance"}))
    assert await groups.groups_of("ou_lead") == ("feishu-dept:od-leads",)
    assert await groups.groups_of("ou_other") == ()
    assert await groups.groups_of("ou_lead") == ("feishu-dept:od-leads",)
    (first, _) = fake.calls_to("user")  # once per user, then cached
    assert first.path == "/open-apis/contact/v3/users/ou_lead"
    assert first.query == {"user_id_type": "open_id", "department_id_type": "open_department_id"}


async def test_feishu_chat_membership_reads_every_page(api, fake):
    members = [f"ou_{i:03d}" for i in range(250)]
    fake.set_chat_members("oc_ops", members)
    groups = FeishuGroups(api, lambda: frozenset({"feishu-group:oc_ops", "feishu-dept:od-leads"}))
    fake.set_departments("ou_249", ["od-leads"])
    assert await groups.groups_of("ou_249") == ("feishu-dept:od-leads", "feishu-group:oc_ops")
    pages = fake.calls_to("chat_members")
    assert len(pages) == 3 and pages[0].query == {"member_id_type": "open_id", "page_size": "100"}
    assert await groups.groups_of("ou_000") == ("feishu-group:oc_ops",)  # ou_000 is outside the contact range
    assert len(fake.calls_to("chat_members")) == 3  # the chat is cached


async def test_feishu_what_cannot_be_read_counts_as_not_a_member(api, fake, caplog):
    groups = FeishuGroups(api, lambda: frozenset({"feishu-group:oc_elsewhere", "feishu-dept:od-leads"}))
    assert await groups.groups_of("ou_stranger") == ()
    assert "feishu group chat oc_elsewhere could not be read (Feishu answered code 232011)" in caplog.text
    assert "feishu departments of user ou_stranger could not be read (Feishu answered code 41050)" in caplog.text
    calls = len(fake.calls)
    assert await groups.groups_of("ou_stranger") == ()
    assert len(fake.calls) == calls  # the next click within seconds asks nothing again
