"""Function calling on the way out: a choice whose text is a JSON object
{"name", "arguments"} (the grammar the worker applied guarantees the shape)
becomes an OpenAI `tool_calls` answer."""

from __future__ import annotations

import json
import uuid
from typing import Any


def parse_tool_call(text: str) -> dict[str, Any] | None:
    """The OpenAI tool call a choice's text encodes, if it encodes one."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None  # cut off by max_tokens: leave it as text
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(value.get("arguments", {}))},
    }


class ToolCallBuffer:
    """Streams text as usual until a choice's first visible character opens a
    JSON object; from then on holds it back, so that a tool call goes out as
    one `tool_calls` delta instead of as content."""

    def __init__(self) -> None:
        self._held: dict[int, list[str]] = {}
        self._decided: dict[int, bool] = {}  # index -> holding back?

    def feed(self, index: int, text: str) -> bool:
        """True when `text` must be held back rather than streamed."""
        if index not in self._decided:
            visible = text.lstrip()
            if not visible:
                self._held.setdefault(index, []).append(text)
                return True
            self._decided[index] = visible.startswith("{")
            if not self._decided[index]:
                return False
        if self._decided[index]:
            self._held.setdefault(index, []).append(text)
            return True
        return False

    def release(self, index: int) -> str:
        """Text held back for a choice that turned out not to be a call."""
        return "".join(self._held.pop(index, []))

    def held_text(self, index: int) -> str:
        return "".join(self._held.get(index, []))

    def undecided_prefix(self, index: int) -> str:
        """Whitespace held while waiting for the first visible character."""
        if self._decided.get(index) is False:
            return self.release(index)
        return ""
