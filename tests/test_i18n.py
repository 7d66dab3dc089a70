"""Two languages: the catalogues are complete, the language follows each entry point (and the
tasks it spawns), and cards come out in Chinese on Feishu and in English on Slack through the fakes."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot import cli_i18n
from bot.core import i18n, language, texts
from bot.core.events import User
from bot.core.policy_file import parse_policy
from tests.fakes.openai_server import calls, text
from tests.feishu_helpers import approval_id_of, at_bot, click, fake_feishu, feishu_bot
from tests.slack_helpers import ALICE, card_message, fake_slack_fixture, mention, slack_bot_fixture
from tests.slack_helpers import click as slack_click
from tests.support_tools import Ledger, notes_toolset
from tools.phrases import Joined

__all__ = ["fake_feishu", "fake_slack_fixture", "feishu_bot", "slack_bot_fixture"]  # fixtures used by this module

NOTE = ("write_note", {"topic": "ops", "text": "restart web-1"})
ARTEFACTS = Path(__file__).parent / "artefacts"


def test_both_catalogues_hold_every_sentence_with_the_same_placeholders():
    sentences = cli_i18n.sources()
    assert len(texts.all_texts()) > 90 and set(texts.all_texts()) < set(sentences)
    assert {"tool:crm.NEW_LEAD", "tool:email.DESCRIBE", "tool:notify.SLACK_LINK", "tool:mcp.RUN_ON_SERVER"} < set(sentences)
    for lang in i18n.LANGUAGES:
        assert cli_i18n.problems(lang) == []
        catalogue = i18n.catalogue(lang)
        assert set(catalogue) == set(sentences)
        for key, source in sentences.items():
            assert cli_i18n.placeholders(catalogue[key]) == cli_i18n.placeholders(source), key
    assert i18n.catalogue("zh")["APPROVE"] == "批准"


def test_a_tools_sentence_is_english_to_code_and_translated_for_the_reader():
    """Tools have no catalogue of their own: their card summaries and preview lines were English on a
    Chinese card. A `Phrase` stays English wherever code reads it (the model, the unchanged-preview check)."""
    from tools import crm

    line = crm.CHANGE(field="status", old=crm.EMPTY(), new=crm.QUOTED(value="won"))
    assert line == "status: (empty) → “won”" and json.dumps([line]) == json.dumps(["status: (empty) → “won”"])
    with i18n.speaking("zh"):
        assert i18n.localised(line) == "status：（空） → “won”"
        assert i18n.localised("typed by a person {x}") == "typed by a person {x}"
        summary = crm.DESCRIBE_UPDATE(lead_id=7, changes=Joined([crm.SET_FIELD(field="owner", value="王五 {x}")]))
        assert i18n.localised(summary) == "更新 CRM 线索 #7：将 owner 设为“王五 {x}”"
    with i18n.speaking("en"):
        assert i18n.localised(line) == "status: (empty) → “won”"


def test_a_stored_outcome_is_shown_in_the_readers_language_its_values_too():
    """A decided card showed the tool's result or failure in English under a Chinese header
    ("已完成：Created lead #3 in the built-in CRM."): the outcome is stored in English, for the model and
    the audit log, and recognised when a card is rendered, like a stored cancel reason."""
    import tools.crm
    import tools.mcp
    import tools.notify
    import tools.smtp  # noqa: F401 - their sentences are declared at import

    with i18n.speaking("zh"):
        assert texts.localize("Created lead #3 in the built-in CRM.") == "已在 内置 CRM 中创建线索 #3。"
        retried = "not sent: the mail server answered 451 4.3.0 busy at MAIL FROM (tried 3 times)"
        assert texts.localize(retried) == "未发送：邮件服务器在 MAIL FROM 阶段回复了 451 4.3.0 busy（已尝试 3 次）"
        changed = (
            "what it would do changed after the card was shown; it now says: No lead has this e-mail: will create a new lead."
        )
        assert texts.localize(changed) == "卡片展示之后，它将要做的事情变了；现在显示为：没有使用该邮箱的线索：将新建一条线索。"
        lost = "the MCP server git disconnected during the call; git_push may or may not have run"
        assert texts.localize(lost) == "调用过程中 MCP 服务器 git 断开了连接；git_push 可能已运行，也可能没有"
        assert texts.localize("deploy failed: disk full") == "deploy failed: disk full"  # an MCP server's own words
    with i18n.speaking("en"):
        assert texts.localize("Created lead #3 in the built-in CRM.") == "Created lead #3 in the built-in CRM."


def test_every_stored_sentence_reads_back_as_its_own_translation():
    """No sentence of ours is mistaken for another when it is recognised from its stored English."""
    import tools.crm
    import tools.email
    import tools.mcp
    import tools.notify
    import tools.smtp  # noqa: F401 - their sentences are declared at import
    from tools.phrases import all_sentences

    def sample(source: str) -> dict[str, str]:
        return {name: f"⟨{name}⟩" for name in cli_i18n.placeholders(source)}

    def recognised(source: str) -> bool:
        return "{" not in source or len(re.sub(r"\{\w+\}|[\W\d_]", "", source)) >= texts.RECOGNISED_LETTERS

    stored: dict[str, set[str]] = {}  # English -> its translations (two sentences may share their English)
    with i18n.speaking("zh"):
        for text in texts.all_texts().values():
            values = sample(text.source)
            stored.setdefault(text.source.format(**values), set()).add(text.format(**values))
        for sentence in all_sentences().values():
            values = sample(sentence.english)
            stored.setdefault(sentence.english.format(**values), set()).add(i18n.localised(sentence(**values)))
        sources = [t.source for t in texts.all_texts().values()] + [s.english for s in all_sentences().values()]
        assert sum(map(recognised, sources)) > 150
        for source in filter(recognised, sources):
            english = source.format(**sample(source))
            assert texts.localize(english) in stored[english], english
        assert texts.localize("deploy failed: disk full") == "deploy failed: disk full"  # too vague to recognise


@contextmanager
def chinese_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sentence: str, instead: str) -> Iterator[None]:
    """The Chinese catalogue with one translation replaced, for the block only."""
    zh = tmp_path / "zh" / "LC_MESSAGES"
    zh.mkdir(parents=True)
    po = i18n.catalogue_path("zh").read_text(encoding="utf-8")
    (zh / "chatops.po").write_text(po.replace(sentence, instead), encoding="utf-8")
    monkeypatch.setattr(i18n, "LOCALES", tmp_path)
    i18n.catalogue.cache_clear()
    try:
        yield
    finally:
        monkeypatch.undo()
        i18n.catalogue.cache_clear()


def test_a_translation_that_does_not_fit_its_values_gives_the_english(tmp_path, monkeypatch):
    from tools import crm

    with chinese_with(tmp_path, monkeypatch, "没有使用该邮箱的线索：将新建一条线索。", "{who} 将新建"), i18n.speaking("zh"):
        assert i18n.localised(crm.NEW_LEAD()) == "No lead has this e-mail: will create a new lead."


def test_sync_with_nothing_new_writes_the_catalogues_back_byte_for_byte(tmp_path, monkeypatch):
    """It stamped a new creation date on every run, leaving the checkout dirty after a sync that changed nothing."""
    before = {lang: i18n.catalogue_path(lang).read_bytes() for lang in i18n.LANGUAGES}
    for lang, data in before.items():  # a copy: other tests read the real ones meanwhile
        (tmp_path / lang / "LC_MESSAGES").mkdir(parents=True)
        (tmp_path / lang / "LC_MESSAGES" / f"{i18n.DOMAIN}.po").write_bytes(data)
    monkeypatch.setattr(i18n, "LOCALES", tmp_path)
    try:
        for lang in i18n.LANGUAGES:
            assert cli_i18n.sync(lang) == 0
            assert i18n.catalogue_path(lang).read_bytes() == before[lang], lang
    finally:
        monkeypatch.undo()
        i18n.catalogue.cache_clear()


def test_a_missing_translation_is_reported(tmp_path, monkeypatch):
    with chinese_with(tmp_path, monkeypatch, 'msgstr "批准"', 'msgstr "批准 {who}"'):
        assert cli_i18n.problems("zh") == ["zh: APPROVE has placeholders ['who'], not []"]


async def test_the_language_is_per_context_and_flows_into_spawned_tasks():
    async def in_task() -> str:
        return f"{texts.APPROVE} / {texts.CARD_REQUESTED_BY.format(who='A')}"

    async def entry(lang: str) -> str:
        i18n.speak(lang)
        return await asyncio.create_task(in_task())

    zh, en = await asyncio.gather(entry("zh"), entry("en"))
    assert (zh, en) == ("批准 / 发起人：A", "Approve / Requested by A")
    assert texts.APPROVE == "Approve"  # the str value stays the English source
    with i18n.speaking("zh", "Asia/Shanghai"):
        assert texts.when(datetime(2030, 1, 2, 3, 4, tzinfo=UTC)) == "2030年1月2日 11:04 +0800"
        assert texts.localize("a newer message arrived in this conversation") == "该会话中有了更新的消息"
        assert texts.localize("cancelled by Alice") == "Alice 已取消"
        assert texts.localize("whatever a person typed") == "whatever a person typed"
    with i18n.speaking("en", "America/Los_Angeles"):
        assert texts.when(datetime(2030, 1, 2, 3, 4, tzinfo=UTC)) == "2030-01-01 19:04 PST"


def test_the_language_is_chosen_from_configuration_then_locale_then_text_then_platform():
    policy = parse_policy(
        '[[channels]]\nmatch = "slack:C0CN"\nlanguage = "zh"\n\n[[channels]]\nmatch = "feishu:*"\ntenant = "t-global"\nlanguage = "en"\n',
        "test",
    )
    slack, feishu = User("slack", "U1", "T1"), User("feishu", "ou_1", "t-cn")
    assert language.choose(policy, slack, "C0CN", locale="en-US", text="hello") == "zh"
    assert language.choose(policy, slack, "C0OPS", locale="zh-CN", text="hello") == "zh"
    assert language.choose(policy, slack, "C0OPS", locale=None, text="帮我写个笔记") == "zh"
    assert language.choose(policy, slack, "C0OPS", locale=None, text="write a note") == "en"
    assert language.choose(policy, slack, "C0OPS") == "en"
    assert language.choose(policy, feishu, "oc_1") == "zh"  # Feishu defaults to Chinese
    assert language.choose(policy, feishu, "oc_1", text="write a note") == "en"
    assert language.choose(policy, User("feishu", "ou_2", "t-global"), "oc_1", text="写笔记") == "en"


async def test_feishu_card_in_chinese_end_to_end(feishu_bot, model):
    ledger = Ledger()
    model.script(calls(NOTE), text("笔记已保存。"))
    bot = await feishu_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(at_bot("给运维写个笔记：重启 web-1", message_id="om_ask"))
    await bot.settle()
    card = bot.card()
    shown = json.loads(card.content)
    assert shown["header"]["title"]["content"] == "需要审批"
    everything = json.dumps(shown, ensure_ascii=False)
    for expected in ["发起人", "过期时间", "审批原因：写操作：由发起人确认", '"批准"', '"拒绝"', "拒绝的原因？"]:
        assert expected in everything
    assert "Approve" not in everything and "Approval needed" not in everything
    write_artefact("feishu-card-zh.txt", feishu_card_as_text(shown))

    status, answer = await bot.send(click(approval_id_of(card), "approve", card_message_id=card.message_id))
    assert (status, answer["toast"]["content"]) == (200, "已批准，正在执行 write_note。")
    await bot.settle()
    final = json.dumps(bot.fake.cards()[-1].json, ensure_ascii=False)
    assert "已完成：note 1 stored" in final and "批准" in final
    assert len(ledger.effects) == 1


async def test_slack_card_in_english_and_in_the_user_locale(slack_bot, fake_slack, model):
    ledger = Ledger()
    model.script(calls(NOTE), text("Stored."), calls(NOTE), text("已保存。"))
    fake_slack.add_user(ALICE, "Alice", locale="en-US", tz="Europe/London")
    fake_slack.add_user("U0WANG", "Wang", locale="zh-CN", tz="Asia/Shanghai")
    bot = await slack_bot(toolsets=[notes_toolset(ledger)])
    await bot.send(mention("please write a note for ops"))
    await bot.settle()
    card = card_message(fake_slack)
    blocks = json.dumps(card["blocks"], ensure_ascii=False)
    assert card["blocks"][0]["text"]["text"] == "Approval needed"
    assert '"Approve"' in blocks and '"Reject"' in blocks and "Requested by" in blocks
    write_artefact("slack-card-en.txt", slack_card_as_text(card["blocks"]))
    assert (await bot.send(slack_click(card)))[0] == 200
    await bot.settle()
    assert "Done: note 1 stored" in json.dumps(fake_slack.messages[card["ts"]]["blocks"])

    await bot.send(mention("write a note please", user="U0WANG"))  # English text, Chinese Slack locale
    await bot.settle()
    card = [m for m in fake_slack.messages.values() if m.get("blocks")][-1]
    assert card["blocks"][0]["text"]["text"] == "需要审批"
    assert "Asia/Shanghai" not in json.dumps(card["blocks"]) and "+0800" in json.dumps(card["blocks"], ensure_ascii=False)


def feishu_card_as_text(card: dict) -> str:
    """The card as a reader sees it (header, then each element's text), for the README."""
    lines = [f"[{card['header']['title']['content']}] {card['header']['subtitle']['content']}"]
    for element in card["body"]["elements"]:
        if element["tag"] == "hr":
            lines.append("────────")
        elif element["tag"] == "form":
            placeholder = element["elements"][0]["placeholder"]["content"]
            buttons = [c["elements"][0]["text"]["content"] for c in element["elements"][1]["columns"]]
            lines.append(f"({placeholder})  " + "  ".join(f"[{b}]" for b in buttons))
        else:
            lines.append(element.get("text", {}).get("content") or element.get("content", ""))
    return "\n".join(lines)


def slack_card_as_text(blocks: list[dict]) -> str:
    lines: list[str] = []
    for block in blocks:
        if block["type"] in ("header", "section") and "text" in block:
            lines.append(block["text"]["text"])
        for cell in block.get("fields", []):
            lines.append(cell["text"])
        if block["type"] in ("context", "actions"):
            parts = [e["text"] if isinstance(e["text"], str) else f"[{e['text']['text']}]" for e in block["elements"]]
            lines.append("  ".join(parts))
    return "\n".join(lines)


def write_artefact(name: str, content: str) -> None:
    """Rendered cards kept for the README (tests/artefacts/, not committed)."""
    ARTEFACTS.mkdir(exist_ok=True)
    (ARTEFACTS / name).write_text(content + "\n", encoding="utf-8")
