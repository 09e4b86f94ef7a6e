"""A sequence's text as it streams: incremental detokenization, and stop strings.

Kept apart from the engine loop because it is the one place where the engine looks at text:
a stop string may span several tokens, so the text that could still be the start of one is
held back from the stream until it cannot match any more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from pagedkv.scheduler.outputs import RequestOutput
from pagedkv.scheduler.request import Request


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


class RequestTexts:
    """The text streams of the requests in flight, one per sequence (made at its first
    token: forks appear late): what an engine with a tokenizer keeps beside the scheduler."""

    def __init__(self) -> None:
        self._streams: dict[str, list[TextStream]] = {}  # per request, per sequence

    def open(self, request_id: str) -> None:
        self._streams[request_id] = []

    def stream(self, seq: Request, new_detokenizer: Callable[[], Detokenizer]) -> TextStream:
        streams = self._streams[seq.request_id]
        while len(streams) <= seq.index:
            streams.append(TextStream(new_detokenizer(), seq.params.stop))
        return streams[seq.index]

    def fill(self, out: RequestOutput) -> RequestOutput:
        """``out`` with its sequences' text filled in: what each one may stream now
        (``new_text``) and all it has streamed (``text``), so that the ``new_text`` of a
        sequence's outputs add up to its final ``text``. A final output closes the request."""
        streams = self._streams[out.request_id] if not out.finished else self._streams.pop(out.request_id)
        sequences = []
        for seq in out.outputs:
            if seq.index < len(streams):
                stream = streams[seq.index]
                new_text = stream.release(seq.finished)
                sequences.append(replace(seq, new_text=new_text, text=stream.text[: stream.sent]))
            else:  # no token yet, so no text
                sequences.append(seq)
        return replace(out, outputs=tuple(sequences))
