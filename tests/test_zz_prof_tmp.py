import asyncio, json, time
from tests.fakes.openai_server import last_user_text, text
from tests.feishu_helpers import at_bot, fake_feishu, feishu_bot
__all__=["fake_feishu","feishu_bot"]
async def test_prof(feishu_bot, model):
    model.responder = lambda body: text(f"answer to {last_user_text(body)}")
    bot = await feishu_bot()
    events = [at_bot(f"q {i}", message_id=f"om_{i}", event_id=f"e_{i}") for i in range(200)]
    gate = asyncio.Semaphore(40)
    async def deliver(p):
        async with gate:
            return (await bot.send(p))[0]
    t=time.monotonic()
    await asyncio.gather(*(deliver(p) for p in events*5))
    t1=time.monotonic()
    await bot.settle()
    t2=time.monotonic()
    print("deliver", t1-t, "settle", t2-t1, "api calls", len(bot.fake.calls))
