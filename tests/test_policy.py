"""The policy file and authorization: who may use the bot, who may decide, under which rule,
re-checked at execution; limits; escalation by argument; TTL per tool."""

from __future__ import annotations

import itertools
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from bot.core.errors import PolicyError
from bot.core.events import DecisionRequest, IncomingMessage, Thread, User
from bot.core.policy_file import load_policy_file, parse_policy
from storage.models import Approval
from tests.fakes.openai_server import calls, last_user_text, text
from tests.support_tools import Ledger, RecordingChannel
from tools.context import ToolContext
from tools.registry import Toolset

RULES = ("confirm", "approve", "separate", "two_person", "deny")

POLICY = """
[access]
slack_teams = ["T1"]
feishu_tenants = ["tenant1"]

[groups]
leads = ["slack:UREQ", "slack:ULEAD", "slack:ULEAD2", "feishu:ou_req", "feishu:ou_lead", "feishu:ou_lead2"]

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

[[tools]]
match = "mail_note"
rule = "confirm"
ttl = "1h"
  [tools.external_recipients]
  allowed_domains = ["example.com"]
  rule = "approve"
"""


def rule_toolset(ledger: Ledger) -> Toolset:
    toolset = Toolset("policy-test")

    def writer(name: str):  # type: ignore[no-untyped-def]
        async def write(ctx: ToolContext, text: str) -> str:
            """Write a note.

            Args:
                text: The note.
            """
            ledger.effects.append({"tool": name, "text": text, "approval_id": ctx.approval_id})
            return "stored"

        return write

    for rule in RULES:
        toolset.tool(name=f"{rule}_note")(writer(f"{rule}_note"))

    @toolset.tool(describe=lambda a: f"Mail {a['to']}")
    async def mail_note(ctx: ToolContext, to: str) -> str:
        """Mail a note.

        Args:
            to: Recipient address.
        """
        ledger.effects.append({"tool": "mail_note", "to": to, "approval_id": ctx.approval_id})
        return "sent"

    return toolset


def people(platform: str) -> dict[str, User]:
    tenant = "T1" if platform == "slack" else "tenant1"
    ids = {"slack": ("UREQ", "ULEAD", "ULEAD2", "UOTHER"), "feishu": ("ou_req", "ou_lead", "ou_lead2", "ou_other")}[platform]
    return {
        "requester": User(platform, ids[0], tenant, "req"),
        "approver": User(platform, ids[1], tenant, "lead"),
        "approver2": User(platform, ids[2], tenant, "lead2"),
        "member": User(platform, ids[3], tenant, "other"),
        "foreign": User(platform, ids[1], "other-tenant", "lead-elsewhere"),  # same id, another workspace/tenant
        "bot": User(platform, "BOT1", tenant, "a bot", is_bot=True),
    }


async def start_policy_bot(bots, model, tmp_path: Path, ledger: Ledger, platform: str, policy: str = POLICY):
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy, encoding="utf-8")
    model.responder = lambda body: (
        text("ok") if body["messages"][-1]["role"] == "tool" else calls((last_user_text(body), {"text": "x"}))
    )
    app = await bots.start(toolsets=[rule_toolset(ledger)], CHATOPS_POLICY=str(policy_file))
    channel = RecordingChannel(platform)
    app.ctx.channels[platform] = channel
    await bots.run(app)
    return app, channel, policy_file


async def propose(app, requester: User, tool: str, key: str) -> str | None:
    await app.core.accept_message(IncomingMessage(requester, tool, Thread(requester.platform, {}), key, (key,)))
    await app.ctx.tasks.idle()
    async with app.ctx.db.transaction() as session:
        return (
            (
                await session.execute(
                    sa.select(Approval.id)
                    .where(Approval.tool_name == tool, Approval.status == "pending")
                    .order_by(Approval.created_at.desc())
                )
            )
            .scalars()
            .first()
        )


EXPECTED = {  # role -> rule -> may this role alone approve (and so cause an execution)?
    "requester": {"confirm": True, "approve": True, "separate": False, "two_person": False},
    "approver": {"confirm": False, "approve": True, "separate": True, "two_person": "vote"},
    "member": {"confirm": False, "approve": False, "separate": False, "two_person": False},
    "foreign": {"confirm": False, "approve": False, "separate": False, "two_person": False},
    "bot": {"confirm": False, "approve": False, "separate": False, "two_person": False},
}


@pytest.mark.parametrize("platform", ["slack", "feishu"])
async def test_authorization_matrix(bots, model, tmp_path, platform):
    ledger = Ledger()
    app, _, _ = await start_policy_bot(bots, model, tmp_path, ledger, platform)
    who = people(platform)
    counter = itertools.count()
    unauthorized, wrongly_blocked = [], []
    for role, rule in itertools.product(EXPECTED, RULES):
        tool = f"{rule}_note"
        approval_id = await propose(app, who["requester"], tool, f"{platform}-{next(counter)}")
        if rule == "deny":
            assert approval_id is None  # a denied call never gets a card
            continue
        before = len(ledger.effects)
        outcome = await app.core.decide(DecisionRequest(approval_id, who[role], approve=True))
        await app.ctx.tasks.idle()
        executed = len(ledger.effects) > before
        expected = EXPECTED[role][rule]
        if executed and expected is not True:
            unauthorized.append((role, rule))
        if expected is True and not executed:
            wrongly_blocked.append((role, rule, outcome.message))
        if expected == "vote" and outcome.kind != "vote_recorded":
            wrongly_blocked.append((role, rule, outcome.message))
        if expected is False:
            assert outcome.kind == "not_allowed", (role, rule, outcome)
        # tidy up: the requester rejects whatever is still pending (allowed for confirm only; else expire)
        async with app.ctx.db.transaction() as session:
            await session.execute(
                sa.update(Approval).where(Approval.id == approval_id, Approval.status == "pending").values(status="cancelled")
            )
    assert unauthorized == [] and wrongly_blocked == []
    assert all(e["tool"] != "deny_note" for e in ledger.effects)


async def test_two_person_rule(bots, model, tmp_path):
    ledger = Ledger()
    app, _, _ = await start_policy_bot(bots, model, tmp_path, ledger, "slack")
    who = people("slack")
    decide = app.core.decide

    async def case(n: int, voters: list[str]) -> list[str]:
        approval_id = await propose(app, who["requester"], "two_person_note", f"two-{n}")
        kinds = []
        for voter in voters:
            kinds.append((await decide(DecisionRequest(approval_id, who[voter], approve=True))).kind)
            await app.ctx.tasks.idle()
        return kinds

    assert await case(1, ["approver"]) == ["vote_recorded"] and ledger.effects == []
    assert await case(2, ["approver", "approver"]) == ["vote_recorded", "already"] and ledger.effects == []
    assert await case(3, ["requester", "approver"]) == ["not_allowed", "vote_recorded"] and ledger.effects == []
    assert await case(4, ["approver", "approver2"]) == ["vote_recorded", "approved"]
    assert len(ledger.effects) == 1  # only the last case executed


async def test_revoking_an_approver_between_click_and_execution_blocks_it(bots, model, tmp_path):
    ledger = Ledger()
    app, _, policy_file = await start_policy_bot(bots, model, tmp_path, ledger, "slack")
    who = people("slack")
    approval_id = await propose(app, who["requester"], "approve_note", "revoke-1")
    # The click lands (decision recorded), but execution has not started yet...
    outcome = await app.core.approvals.decide(DecisionRequest(approval_id, who["approver"], approve=True))
    assert outcome.kind == "approved"
    # ...when an admin removes the approver from the policy file.
    policy_file.write_text(POLICY.replace('"slack:ULEAD", ', ""), encoding="utf-8")
    assert await app.core.executor.execute(approval_id) is False
    async with app.ctx.db.transaction() as session:
        row = await session.get(Approval, approval_id)
    assert row.status == "cancelled" and "may no longer approve" in row.decision_reason
    assert ledger.effects == []


async def test_recipients_outside_allowed_domains_escalate_and_ttl_comes_from_the_rule(bots, model, tmp_path):
    ledger = Ledger()
    app, _, _ = await start_policy_bot(bots, model, tmp_path, ledger, "slack")
    who = people("slack")
    model.responder = lambda body: (
        text("ok") if body["messages"][-1]["role"] == "tool" else calls(("mail_note", {"to": last_user_text(body)}))
    )
    await propose(app, who["requester"], "colleague@example.com", "mail-1")
    await propose(app, who["requester"], "someone@gmail.com", "mail-2")
    async with app.ctx.db.transaction() as session:
        rows = {a.args["to"]: a for a in (await session.execute(sa.select(Approval))).scalars()}
    assert rows["colleague@example.com"].rule == "confirm"
    assert rows["someone@gmail.com"].rule == "approve"
    assert "external recipients: someone@gmail.com" in rows["someone@gmail.com"].card["warnings"]
    ttl = rows["colleague@example.com"].expires_at - rows["colleague@example.com"].created_at
    assert timedelta(minutes=59) < ttl <= timedelta(hours=1)
    outside, inside = rows["someone@gmail.com"].id, rows["colleague@example.com"].id
    assert (await app.core.decide(DecisionRequest(outside, who["requester"], approve=True))).kind == "not_allowed"
    assert (await app.core.decide(DecisionRequest(inside, who["requester"], approve=True))).kind == "approved"


async def test_limits_refuse_floods_and_fast_requesters(bots, model, tmp_path):
    ledger = Ledger()
    policy = POLICY + "\n[limits]\nrequests_per_minute = 3\nmax_pending_approvals = 2\n"
    app, channel, _ = await start_policy_bot(bots, model, tmp_path, ledger, "slack", policy=policy)
    who = people("slack")
    for i in range(4):
        await propose(app, who["requester"], "confirm_note", f"flood-{i}")
    async with app.ctx.db.transaction() as session:
        pending = (await session.execute(sa.select(Approval).where(Approval.status == "pending"))).scalars().all()
    assert len(pending) == 2
    assert any("approvals waiting" in r for r in channel.replies)
    assert any("faster than allowed (3 per minute)" in r for r in channel.replies)


async def test_access_rules(bots, model, tmp_path):
    policy = POLICY.replace("[access]\n", '[access]\ndeny_users = ["slack:UOTHER"]\nchannels = ["slack:C_OPS"]\n')
    app, channel, _ = await start_policy_bot(bots, model, tmp_path, Ledger(), "slack", policy=policy)
    who = people("slack")
    for user, channel_id in [
        (who["member"], "C_OPS"),
        (who["foreign"], "C_OPS"),
        (who["requester"], "C_RANDOM"),
        (who["bot"], "C_OPS"),
    ]:
        key = f"access-{user.id}-{user.tenant}-{channel_id}"
        await app.core.accept_message(IncomingMessage(user, "confirm_note", Thread("slack", {}), key, (key,), channel_id))
    await app.ctx.tasks.idle()
    assert len(model.requests) == 0
    assert len(channel.replies) == 4 and all(r.startswith("Sorry, you cannot use chatops") for r in channel.replies)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[tools]]\nmatch = 'x'\nrule = 'aprove'\n", "policy.toml:3: tools.0.rule: Input should be"),
        ("[[tools]]\nmatch = 'x'\nrule = 'approve'\n", "needs an `approvers` list"),
        ("[access]\nusers = ['U123']\n", "is neither a group name nor an identity"),
        ("[limits]\nrequests_per_minute = 0\n", "policy.toml:2: limits.requests_per_minute"),
        ("[[tools]]\nmatch = 'x'\nrule = 'confirm'\nttl = '3 weeks'\n", "policy.toml:4: tools.0.ttl"),
        ("[access\n", "policy.toml: Expected ']'"),
        ("[surprise]\nkey = 1\n", "surprise: Extra inputs are not permitted"),
    ],
)
def test_a_malformed_policy_names_the_line_and_reason(text, message):
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "policy.toml")
    assert message in str(info.value)


def test_the_example_policy_is_valid():
    policy = load_policy_file(Path(__file__).resolve().parents[1] / "policy.example.toml")
    assert [t.match for t in policy.tools][:2] == ["search_*", "create_crm_lead"]


async def test_policy_check_and_tools_commands(tmp_path):
    from tests.test_cli import chatops

    good = tmp_path / "good.toml"
    good.write_text(POLICY.replace("confirm_note", "search_crm_leads").replace("deny_note", "notify_slack"), encoding="utf-8")
    code, out, _ = await chatops("policy", "check", str(good), cwd=tmp_path)
    assert code == 0 and out.startswith("OK:")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[tools]]\nmatch = 'x'\nrule = 'sometimes'\n", encoding="utf-8")
    code, _, err = await chatops("policy", "check", str(bad), cwd=tmp_path)
    assert code == 2 and f"{bad}:3" in err and "Traceback" not in err
    code, _, err = await chatops("policy", "check", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert code == 2 and err.strip() == f"chatops: error: cannot read {tmp_path / 'missing.toml'}: No such file or directory"
    env = {"CHATOPS_MODEL": "m", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "CHATOPS_POLICY": str(bad)}
    code, _, err = await chatops("serve", env=env, cwd=tmp_path)
    assert code == 2 and f"{bad}:3" in err
    code, out, _ = await chatops("tools", env={"CHATOPS_POLICY": str(good)}, cwd=tmp_path)
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "deny" in lines["notify_slack"] and "confirm" in lines["search_crm_leads"]
    code, out, err = await chatops("tools", "--channel", "bogus", cwd=tmp_path)  # was listed as a channel named so
    assert code == 2 and out == "" and "'bogus' is not PLATFORM:CHANNEL" in err


def test_deny_bidi_controls_denies_them_anywhere_in_the_arguments_and_only_when_set():
    from tests.support_tools import notes_toolset

    spec = next(s for s in notes_toolset(Ledger()).specs if s.name == "write_note")
    strict = parse_policy("[arguments]\ndeny_bidi_controls = true\n", "strict.toml")
    for args in ({"topic": "a\u2067b", "text": "x"}, {"topic": "ok", "text": ["fine", {"k\u200f": "v"}]}):
        rule = strict.rule_for(spec, args)
        assert rule.rule == "deny" and "text-direction controls (U+" in rule.reason
    assert strict.rule_for(spec, {"topic": "a\u200bb", "text": "zero-width is shown, not denied"}).rule == "confirm"
    assert parse_policy("", "default.toml").rule_for(spec, {"topic": "a\u202eb", "text": "x"}).rule == "confirm"
    with pytest.raises(PolicyError, match="deny_bidi"):
        parse_policy("[arguments]\ndeny_bidi = true\n", "typo.toml")
