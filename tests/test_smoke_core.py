from tests.fakes.openai_server import calls, text
from tests.support_tools import Ledger, notes_toolset


async def test_smoke(terminal_bot, model):
    ledger = Ledger()
    model.script(calls(("write_note", {"topic": "a", "text": "hello"})), text("done!"))
    bot = await terminal_bot(toolsets=[notes_toolset(ledger)])
    await bot.say("write a note")
    out = bot.transcript()
    print(out)
    approval_id = out.split("approve ")[1].split()[0]
    await bot.say(f"approve {approval_id}")
    print(bot.transcript())
    assert ledger.effects and ledger.effects[0]["approval_id"] == approval_id
    assert "bot> done!" in bot.transcript()
