"""CHATOPS_EVENT_LOOP: the loop `chatops serve` and its workers run on (`bot.lifecycle.run`)."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from bot import lifecycle
from bot.config import Settings
from bot.core.errors import ConfigError


async def running_loop() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


@pytest.mark.parametrize(("choice", "expected"), [("auto", uvloop.Loop), ("uvloop", uvloop.Loop)])
def test_uvloop_is_the_default_and_can_be_asked_for(choice, expected):
    assert lifecycle.run(running_loop(), Settings.model_validate({"CHATOPS_EVENT_LOOP": choice})) is expected


def test_asyncio_can_be_chosen():
    loop = lifecycle.run(running_loop(), Settings.model_validate({"CHATOPS_EVENT_LOOP": "asyncio"}))
    assert loop.__module__.startswith("asyncio.")


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as on a machine where it is not installed
    loop = lifecycle.run(running_loop(), Settings.model_validate({"CHATOPS_EVENT_LOOP": "auto"}))
    assert loop.__module__.startswith("asyncio.")
    with pytest.raises(ConfigError, match="CHATOPS_EVENT_LOOP is uvloop, but uvloop is not installed"):
        lifecycle.loop_factory("uvloop")


def test_an_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="CHATOPS_EVENT_LOOP"):
        Settings.model_validate({"CHATOPS_EVENT_LOOP": "trio"})
