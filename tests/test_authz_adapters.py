"""Who may decide, through the adapters' real click paths.

Slack: signed `block_actions` POSTed to `/slack/events` of a running bot whose Web API is the fake
Slack (user groups from `usergroups.users.list`). Feishu: `card.action.trigger` callbacks, encrypted
and signed, POSTed to `/feishu/events` in webhook mode (departments and chat members from the fake
Feishu). One bot per platform runs the whole matrix: rules {confirm, approve, approve + separate,
two_person, deny} x clickers {requester, approver listed by id, approver through a group, another
member, the same id in another workspace/tenant, a bot in the approvers' group}. The requester may
only use the bot through a group (`access.users`), so the message path resolves groups too.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bot.core import texts
from storage.models import Approval, AuditEvent
from tests import feishu_helpers as fh
from tests import slack_helpers as sh
from tests.fakes.feishu_api import BOT_OPEN_ID
from tests.fakes.openai_server import calls, last_user_text, text
from tests.feishu_helpers import fake_feishu, feishu_bot
from tests.slack_helpers import fake_slack_fixture, slack_bot_fixture  # noqa: F401 - fixtures
from tests.support_tools import Ledger
from tests.test_policy import rule_toolset

__all__ = ["fake_feishu", "feishu_bot"]  # fixtures used by this module

RULES = ("confirm", "approve", "separate", "two_person")  # `deny` never gets a card (checked separately)
ROLES = ("requester", "approver", "group_approver", "member", "foreign", "bot")
EXPECTED: dict[str, dict[str, bool | str]] = {  # may this clicker alone approve (and so cause an execution)?
    "requester": {"confirm": True, "approve": True, "separate": False, "two_person": False},
    "approver": {"confirm": False, "approve": True, "separate": True, "two_person": "vote"},
    "group_approver": {"confirm": False, "approve": True, "separate": True, "two_person": "vote"},
    "member": {"confirm": False, "approve": False, "separate": False, "two_person": False},
    "foreign": {"confirm": False, "approve": False, "separate": False, "two_person": False},
    "bot": {"confirm": False, "approve": False, "separate": False, "two_person": False},
}
SECOND = {"approver": "group_approver", "group_approver": "approver"}  # the other approver completes two_person
CLICK_DEADLINE = 2.5  # seconds: Slack and Feishu want an answer within 3

# No tenant allow-list on purpose: the "foreign" clicker is refused by the requester's-tenant rule alone.
POLICY = """
[access]
users = ["{staff}"]

[groups]
leads = ["{requester}", "{approver}", "{group}"]

[[tools]]
match = "confirm_note"
rule = "confirm"

[[tools]]
match = "approve_note"
rule = "approve"
approvers = ["leads"]

[[tools]]
match = "separate_note"
rule = "approve"
approvers = ["leads"]
separate = true

[[tools]]
match = "two_person_note"
rule = "two_person"
approvers = ["leads"]

[[tools]]
match = "deny_note"
rule = "deny"
"""


def ask_for_the_named_tool(body: dict[str, Any]) -> Any:
    """The scripted model: call the tool named by the user's text, then say ok."""
    if body["messages"][-1]["role"] == "tool":
        return text("ok")
    return calls((last_user_text(body), {"text": "x"}))


@dataclass
class Driver:
    """One platform's way to ask, find the cards, click, and read what a clicker was told."""

    app: Any
    settle: Callable[[], Awaitable[None]]
    ask: Callable[[str, str], Awaitable[str]]  # (tool, sender role) -> conversation key
    cards: Callable[[], dict[str, str]]  # conversation key -> approval id
    click: Callable[[str, str], Awaitable[None]]  # (conversation key, clicker role)
    told: Callable[[str, str], list[str]]  # (conversation key, clicker role) -> private answers
    replies_to: Callable[[str], list[str]]  # conversation key -> the bot's plain replies there
    latencies: list[float] = field(default_factory=list)


async def audit_refusals(app: Any) -> Counter[str | None]:
    """`click_refused` / `not_allowed` audit rows per approval."""
    await app.ctx.audit.chain(app.ctx.db)
    async with app.ctx.db.transaction() as session:
        refused = sa.select(AuditEvent.approval_id).where(AuditEvent.kind == "click_refused", AuditEvent.status == "not_allowed")
        return Counter((await session.execute(refused)).scalars())


async def votes_of(app: Any, approval_id: str) -> tuple[str, int]:
    async with app.ctx.db.transaction() as session:
        row = await session.get(Approval, approval_id)
        assert row is not None
        return row.status, len(row.votes or [])


async def run_matrix(driver: Driver, ledger: Ledger) -> None:
    """Every clicker on every rule (deny: no card at all), then the second two_person votes."""
    keys: dict[tuple[str, str], str] = {}
    for role, rule in itertools.product(ROLES, RULES):
        keys[role, rule] = await driver.ask(f"{rule}_note", "requester")
    denied = await driver.ask("deny_note", "requester")
    outsider = await driver.ask("approve_note", "member")  # not in the staff group: may not use the bot
    await driver.settle()
    approval_ids = driver.cards()
    assert denied not in approval_ids and outsider not in approval_ids
    assert driver.replies_to(outsider) == [texts.NOT_ALLOWED_TO_USE.format(reason="you are not on the list of chatops users")]

    for (role, _), key in keys.items():
        await driver.click(key, role)
    await driver.settle()
    refusals = await audit_refusals(driver.app)
    executed = {e["approval_id"] for e in ledger.effects}
    unauthorized, wrongly_blocked, misreported = [], [], []
    for (role, rule), key in keys.items():
        approval_id, expected = approval_ids[key], EXPECTED[role][rule]
        told = driver.told(key, role)
        refused = any(t.startswith(texts.NOT_ALLOWED.split(":")[0]) for t in told)
        if approval_id in executed and expected is not True:
            unauthorized.append((role, rule))
        if expected is True and approval_id not in executed:
            wrongly_blocked.append((role, rule, told))
        if expected == "vote" and await votes_of(driver.app, approval_id) != ("pending", 1):
            wrongly_blocked.append((role, rule, told))
        if (refused, refusals.get(approval_id)) != ((True, 1) if expected is False else (False, None)):
            misreported.append((role, rule, told, refusals.get(approval_id)))  # the private notice and the audit row
    assert (unauthorized, wrongly_blocked, misreported) == ([], [], [])

    for role, other in SECOND.items():  # a second, distinct approver completes two_person
        await driver.click(keys[role, "two_person"], other)
    await driver.settle()
    executed = {e["approval_id"] for e in ledger.effects}
    assert {approval_ids[keys[role, "two_person"]] for role in SECOND} <= executed
    expected_runs = sum(1 for role, rule in keys if EXPECTED[role][rule] is True) + len(SECOND)
    assert len(ledger.effects) == len(executed) == expected_runs  # each ran once, nothing else ran
    assert all(e["tool"] != "deny_note" for e in ledger.effects)
    assert max(driver.latencies) < CLICK_DEADLINE


async def revoke_the_group_and_click(driver: Driver, policy_file: Path, group: str, ledger: Ledger) -> None:
    """Removing a group from the policy file takes effect at the next click, although memberships are cached."""
    policy_file.write_text(policy_file.read_text(encoding="utf-8").replace(f', "{group}"', ""), encoding="utf-8")
    key = await driver.ask("approve_note", "requester")
    await driver.settle()
    approval_id = driver.cards()[key]
    await driver.click(key, "group_approver")
    await driver.settle()
    assert approval_id not in {e["approval_id"] for e in ledger.effects}
    assert any(t.startswith(texts.NOT_ALLOWED.split(":")[0]) for t in driver.told(key, "group_approver"))
    await driver.click(key, "approver")
    await driver.settle()
    assert approval_id in {e["approval_id"] for e in ledger.effects}


def write_policy(tmp_path: Path, **ids: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY.format(**ids), encoding="utf-8")
    return path


# ---------------------------------------------------------------------- Slack
SLACK_PEOPLE = {  # role -> (user id, workspace)
    "requester": ("U0REQ", sh.TEAM_ID),
    "approver": ("U0LEAD", sh.TEAM_ID),
    "group_approver": ("U0GROUPIE", sh.TEAM_ID),
    "member": ("U0OTHER", sh.TEAM_ID),
    "foreign": ("U0GROUPIE", "T0ELSEWHERE"),  # a group member's id, but from another workspace
    "bot": ("U0HELPERBOT", sh.TEAM_ID),  # users.info says it is a bot; it is in the approvers' group
}


def slack_driver(bot: sh.SlackBot) -> Driver:
    fake = bot.fake
    snapshots: dict[str, dict[str, Any]] = {}

    async def ask(tool: str, role: str) -> str:
        ts = sh.next_ts()
        status, _ = await bot.send(sh.mention(tool, user=SLACK_PEOPLE[role][0], ts=ts))
        assert status == 200
        return ts

    def cards() -> dict[str, str]:
        for message in fake.messages.values():
            if message.get("blocks") and message["thread_ts"] not in snapshots and "chatops_approve" in json.dumps(message):
                snapshots[message["thread_ts"]] = json.loads(json.dumps(message))  # before chat.update changes it
        return {ts: sh.approval_id_of(m) for ts, m in snapshots.items()}

    async def click(key: str, role: str) -> None:
        user, team = SLACK_PEOPLE[role]
        payload = sh.click(snapshots[key], user=user)
        payload["user"]["team_id"] = team
        started = time.monotonic()
        status, _ = await bot.send(payload)
        driver.latencies.append(time.monotonic() - started)
        assert status == 200

    def told(key: str, role: str) -> list[str]:
        user = SLACK_PEOPLE[role][0]
        ephemerals = fake.calls_to("chat.postEphemeral")
        return [c.params["text"] for c in ephemerals if c.params["user"] == user and c.params.get("thread_ts") == key]

    def replies_to(key: str) -> list[str]:
        return [m["text"] for m in bot.replies() if m["thread_ts"] == key]

    driver = Driver(bot.app, bot.settle, ask, cards, click, told, replies_to)
    return driver


async def test_slack_clicks_are_authorised_by_id_group_workspace_and_bot_flag(slack_bot, fake_slack, model, tmp_path):
    ledger = Ledger()
    model.responder = ask_for_the_named_tool
    fake_slack.set_usergroup("S0STAFF", ["U0REQ"])
    fake_slack.set_usergroup("S0LEADS", ["U0GROUPIE", "U0HELPERBOT"])
    fake_slack.add_user("U0HELPERBOT", "helper", is_bot=True)
    policy = write_policy(
        tmp_path, staff="slack-group:S0STAFF", requester="slack:U0REQ", approver="slack:U0LEAD", group="slack-group:S0LEADS"
    )
    bot = await slack_bot(toolsets=[rule_toolset(ledger)], env={"CHATOPS_POLICY": str(policy)})
    driver = slack_driver(bot)

    await run_matrix(driver, ledger)
    asked = {c.params["usergroup"] for c in fake_slack.calls_to("usergroups.users.list")}
    assert asked == {"S0STAFF", "S0LEADS"}
    assert len(fake_slack.calls_to("usergroups.users.list")) <= 4  # cached, not asked per click
    await revoke_the_group_and_click(driver, policy, "slack-group:S0LEADS", ledger)


# ---------------------------------------------------------------------- Feishu
FEISHU_PEOPLE = {  # role -> (open_id, tenant)
    "requester": ("ou_req", fh.TENANT),
    "approver": ("ou_lead", fh.TENANT),
    "group_approver": ("ou_groupie", fh.TENANT),  # in the approvers' department
    "member": ("ou_other", fh.TENANT),
    "foreign": ("ou_groupie", "tenant-elsewhere"),  # a department member's id, but from another tenant
    "bot": (BOT_OPEN_ID, fh.TENANT),  # the bot itself, even placed in the approvers' department
}


def feishu_driver(bot: fh.FeishuBot) -> Driver:
    fake = bot.fake
    ids = itertools.count(1)
    answers: dict[tuple[str, str], list[str]] = {}

    async def ask(tool: str, role: str) -> str:
        message_id = f"om_ask_{next(ids)}"
        status, _ = await bot.send(fh.at_bot(tool, message_id=message_id, sender=FEISHU_PEOPLE[role][0]))
        assert status == 200
        return message_id

    found: dict[str, tuple[str, str]] = {}  # asking message -> (approval id, card message id)

    def cards() -> dict[str, str]:
        for card in fake.cards():
            if card.reply_to and card.reply_to not in found:  # read before a decision patches the form away
                found[card.reply_to] = (fh.approval_id_of(card), card.message_id)
        return {key: approval_id for key, (approval_id, _) in found.items()}

    async def click(key: str, role: str) -> None:
        open_id, tenant = FEISHU_PEOPLE[role]
        approval_id, card_message_id = found[key]
        payload = fh.click(approval_id, operator=open_id, card_message_id=card_message_id)
        payload["event"]["operator"]["tenant_key"] = tenant
        started = time.monotonic()
        status, answer = await bot.send(payload)
        driver.latencies.append(time.monotonic() - started)
        assert status == 200
        answers.setdefault((key, role), []).append(answer["toast"]["content"])

    def told(key: str, role: str) -> list[str]:
        return answers.get((key, role), [])

    def replies_to(key: str) -> list[str]:
        return [m.json["text"] for m in fake.sent() if m.msg_type == "text" and m.reply_to == key]

    driver = Driver(bot.app, bot.settle, ask, cards, click, told, replies_to)
    return driver


async def test_feishu_clicks_are_authorised_by_id_department_tenant_and_bot(feishu_bot, fake_feishu, model, tmp_path):
    ledger = Ledger()
    model.responder = ask_for_the_named_tool
    fake_feishu.set_chat_members("oc_staff", ["ou_req"])
    for open_id in ("ou_groupie", BOT_OPEN_ID):
        fake_feishu.set_departments(open_id, ["od-leads", "od-sales"])
    for open_id in ("ou_req", "ou_lead", "ou_other"):
        fake_feishu.set_departments(open_id, ["od-sales"])
    policy = write_policy(
        tmp_path,
        staff="feishu-group:oc_staff",
        requester="feishu:ou_req",
        approver="feishu:ou_lead",
        group="feishu-dept:od-leads",
    )
    bot = await feishu_bot(toolsets=[rule_toolset(ledger)], env={"CHATOPS_POLICY": str(policy)})
    driver = feishu_driver(bot)

    await run_matrix(driver, ledger)
    assert {c.path.rsplit("/", 2)[-2] for c in fake_feishu.calls_to("chat_members")} == {"oc_staff"}
    users_asked = [c.path.rsplit("/", 1)[-1] for c in fake_feishu.calls_to("user")]
    assert len(users_asked) == len(set(users_asked))  # each person's departments asked once (cached)
    await revoke_the_group_and_click(driver, policy, "feishu-dept:od-leads", ledger)
