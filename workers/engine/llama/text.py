"""Incremental text assembly: UTF-8 across token boundaries and stop strings
that never leak, even partially, into a stream."""

from __future__ import annotations

import codecs


class StopBuffer:
    """Holds back the tail of the text that could still become a stop string."""

    __slots__ = ("_pending", "_stops", "matched")

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        # The stop string that ended the text (llama-server's stopping_word).
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string matched).
        On a match the stop string and everything after it are dropped."""
        if not self._stops:
            return text, False
        pending = self._pending + text
        first = -1
        for stop in self._stops:
            at = pending.find(stop)
            if at != -1 and (first == -1 or at < first):
                first = at
                self.matched = stop
        if first != -1:
            self._pending = ""
            return pending[:first], True
        hold = 0
        for stop in self._stops:
            # Longest proper prefix of the stop string that ends the text.
            for size in range(min(len(stop) - 1, len(pending)), hold, -1):
                if pending.endswith(stop[:size]):
                    hold = size
                    break
        cut = len(pending) - hold
        self._pending = pending[cut:]
        return pending[:cut], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class TextAssembler:
    """Token pieces (bytes) in, text out: UTF-8 sequences split across tokens
    are held until complete, then stop strings are applied."""

    __slots__ = ("_decoder", "_stop", "stopped", "text_parts")

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = StopBuffer(stops)
        self.stopped = False
        self.text_parts: list[str] = []

    def push(self, piece: bytes) -> str:
        text, self.stopped = self._stop.push(self._decoder.decode(piece))
        if text:
            self.text_parts.append(text)
        return text

    def finish(self) -> str:
        """Flush what was held back (the sequence ended without a stop string)."""
        tail, stopped = self._stop.push(self._decoder.decode(b"", final=True))
        if not stopped:
            tail += self._stop.flush()
        if tail:
            self.text_parts.append(tail)
        return tail

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def stop_word(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._stop.matched
