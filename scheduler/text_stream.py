"""A sequence's text as it streams: incremental detokenization, and stop strings.

Kept apart from the engine loop because it is the one place where the engine looks at text:
a stop string may span several tokens, so the text that could still be the start of one is
held back from the stream until it cannot match any more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Detokenizer(Protocol):
    def step(self, token_id: int) -> str:
        """The text this token completes (possibly empty, while a character is partial)."""


@dataclass
class TextStream:
    """One sequence's incremental detokenization, and its stop strings.

    ``text`` is all the text decoded so far (cut right before a stop string once one is
    found); ``sent`` is how much of it has been streamed. What lies between is held back
    because it could still be the start of a stop string."""

    detokenizer: Detokenizer
    stop: Sequence[str] = ()
    text: str = ""
    sent: int = 0

    def add(self, token_id: int) -> bool:
        """Decode one more token; return whether the text now contains a stop string (and
        cut it there). Only the new piece and the ``longest stop - 1`` characters before it
        are searched: the text before held no stop string, so any match ends in the piece."""
        piece = self.detokenizer.step(token_id)
        if not piece:
            return False
        if not self.stop:
            self.text += piece
            return False
        start = max(0, len(self.text) - max(map(len, self.stop)) + 1)
        window = self.text[start:] + piece
        found = [i for i in (window.find(s) for s in self.stop) if i >= 0]
        self.text += piece
        if found:  # the earliest match wins
            self.text = self.text[: start + min(found)]
            return True
        return False

    def release(self, finished: bool) -> str:
        """The text to stream now: everything not yet sent, but while the sequence runs, not
        a suffix that could be the start of a stop string."""
        end = len(self.text) if finished else max(self.sent, len(self.text) - self._held())
        new_text, self.sent = self.text[self.sent : end], end
        return new_text

    def _held(self) -> int:
        """The length of the longest suffix of the text that is a proper prefix of a stop string."""
        text, held = self.text, 0
        for stop in self.stop:
            tail = text[len(text) - len(stop) + 1 :] if len(stop) <= len(text) else text
            i = tail.find(stop[0])
            while 0 <= i and len(tail) - i > held:  # longest candidates first
                if stop.startswith(tail[i:]):
                    held = len(tail) - i
                    break
                i = tail.find(stop[0], i + 1)
        return held
