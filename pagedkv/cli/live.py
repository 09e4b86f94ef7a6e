"""Show several streaming requests in a terminal at once.

On a terminal, one line per request is redrawn in place as its text grows (the tail of
the text, cut to the terminal's width), so several streams stay readable side by side.
Elsewhere (a pipe, a log file) each request is printed whole when it finishes.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from pagedkv.scheduler import RequestOutput


class LiveView:
    def __init__(self, labels: dict[str, str], out: TextIO | None = None, fps: float = 15.0) -> None:
        self.labels = labels  # request id -> short label shown before its text
        self.out = out or sys.stdout  # looked up now, not at import, so redirection works
        self.tty = self.out.isatty()
        self.texts = {rid: "" for rid in labels}
        self.status = {rid: "" for rid in labels}
        self._interval = 1.0 / fps
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, output: RequestOutput) -> None:
        rid = output.request_id
        self.texts[rid] = output.text or " ".join(map(str, output.output_token_ids))
        if output.finished:
            m, reason = output.metrics, output.finish_reason
            done = f"{m.finish_time - m.arrival_time:.2f} s" if m.finish_time is not None else "?"
            self.status[rid] = (
                f"[{len(output.output_token_ids)} tok, {reason.value if reason else '?'}, "
                f"TTFT {m.ttft:.2f} s, done {done}]"
            )
            if not self.tty:
                print(f"{self.labels[rid]} {self.status[rid]}\n{self.texts[rid].strip()}\n", file=self.out, flush=True)
        if self.tty and (output.finished or time.monotonic() - self._last_draw >= self._interval):
            self.draw()

    def draw(self) -> None:
        width = shutil.get_terminal_size((100, 20)).columns - 1
        if self._drawn:
            self.out.write(f"\x1b[{len(self.labels)}F")  # back to the first of our lines
        for rid, label in self.labels.items():
            text = " ".join(self.texts[rid].split())  # one line: newlines and runs of spaces folded
            head = f"{label} {self.status[rid]} " if self.status[rid] else f"{label} "
            room = max(width - len(head), 10)
            tail = text if len(text) <= room else "…" + text[-(room - 1):]
            self.out.write(f"\x1b[2K{head}{tail}\n")
        self.out.flush()
        self._drawn = True
        self._last_draw = time.monotonic()

    def finish(self, full: bool = True) -> None:
        """Final redraw, then (on a terminal) every request's whole text."""
        if not self.tty:
            return
        self.draw()
        if full:
            for rid, label in self.labels.items():
                print(f"\n{label}\n{self.texts[rid].strip()}", file=self.out)
            print(file=self.out)
