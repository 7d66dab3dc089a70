"""A small real toolset for core tests: a read tool and two write tools that record their effects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tools.context import ToolContext
from tools.errors import ToolError, ToolInDoubt
from tools.registry import Toolset


@dataclass
class Ledger:
    """Every effect a write tool had, with the approval id it ran under."""

    effects: list[dict[str, Any]] = field(default_factory=list)


def notes_toolset(ledger: Ledger) -> Toolset:
    toolset = Toolset("test-notes")

    @toolset.tool(read_only=True)
    async def count_notes(ctx: ToolContext, topic: str) -> str:
        """Count the notes stored under a topic.

        Args:
            topic: The topic to count.
        """
        return str(sum(1 for e in ledger.effects if e["topic"] == topic))

    @toolset.tool(describe=lambda a: f"Write a note about {a['topic']}")
    async def write_note(ctx: ToolContext, topic: str, text: str, priority: int = 1) -> str:
        """Write a note.

        Args:
            topic: What the note is about.
            text: The note itself.
            priority: 1 (low) to 5 (high).
        """
        if topic == "fail":
            raise ToolError("the note store refused the note")
        if topic == "doubt":
            ledger.effects.append({"topic": topic, "text": text, "approval_id": ctx.approval_id})
            raise ToolInDoubt("the store dropped the connection after receiving the note")
        ledger.effects.append({"topic": topic, "text": text, "priority": priority, "approval_id": ctx.approval_id})
        return f"note {len(ledger.effects)} stored"

    return toolset


class RecordingChannel:
    """A real `Channel` that keeps what the core sends, for tests that need no platform."""

    def __init__(self, platform: str) -> None:
        self.platform = platform
        self.replies: list[str] = []
        self.cards: list[Any] = []

    async def post_reply(self, thread: Any, text: str) -> None:
        self.replies.append(text)

    async def show_working(self, thread: Any) -> None:
        return None

    async def post_card(self, thread: Any, card: Any) -> str:
        self.cards.append(card)
        return str(card.approval_id)

    async def update_card(self, thread: Any, message_id: str, card: Any) -> None:
        self.cards.append(card)
