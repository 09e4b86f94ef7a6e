"""Intra-op threads that leave room for other work on the same cores.

PyTorch's CPU ops (and the paged-attention kernel) split each op evenly over a fixed team of
OpenMP threads and wait for the slowest. When another process keeps one of the cores busy,
the thread sharing that core runs a time slice in two, and every op waits for it: on this
2-core machine, SmolLM2 in bfloat16 took 54x longer with 2 threads beside a busy process than
with 1 (docs/benchmarks.md). Fewer threads than cores, on the other hand, only cost the cores
nobody else wants.

:class:`ThreadGovernor` samples how many runnable threads the machine has that are not this
process's own (Linux: ``/proc/loadavg`` counts every runnable thread of the kernel, across
containers; ``/proc/self/task`` tells which are ours) and sets PyTorch's thread count to the
cores left over, at least one. A change needs two samples in a row that agree, so a process
that runs for an instant does not move it. Where ``/proc`` is missing it does nothing.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

SAMPLE_INTERVAL_S = 0.2


def others_running(proc: Path = Path("/proc")) -> int | None:
    """Runnable threads on the machine that are not this process's, or None if unknown."""
    try:
        running = int((proc / "loadavg").read_text().split()[3].split("/")[0])
        ours = 0
        for task in (proc / "self" / "task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:  # the thread ended while we looked
                continue
            ours += stat[stat.rindex(")") + 2] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(running - ours, 0)


class ThreadGovernor:
    """Keeps ``torch.get_num_threads()`` at the cores other work leaves free, up to ``max_threads``."""

    def __init__(
        self,
        max_threads: int | None = None,
        sample: Callable[[], int | None] = others_running,
        clock: Callable[[], float] = time.monotonic,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        self.max_threads = max_threads or torch.get_num_threads()
        self.threads = self.max_threads
        self._sample, self._clock, self._set_threads = sample, clock, set_threads
        self._last_sample = float("-inf")
        self._pending: int | None = None  # what the previous sample asked for

    def update(self) -> int:
        """Sample (at most every SAMPLE_INTERVAL_S) and adjust; returns the thread count in force."""
        now = self._clock()
        if now - self._last_sample < SAMPLE_INTERVAL_S:
            return self.threads
        self._last_sample = now
        others = self._sample()
        if others is None:  # unknown: no opinion, and the next sample starts afresh
            self._pending = None
            return self.threads
        wanted = min(max(self.max_threads - others, 1), self.max_threads)
        if wanted != self.threads and wanted == self._pending:
            self.threads = wanted
            self._set_threads(wanted)
        self._pending = wanted
        return self.threads


@functools.cache
def shared_governor() -> ThreadGovernor:
    """The process's governor: PyTorch's thread count is process-wide, so every runner shares
    one, whose ceiling is the thread count in force when the first runner asked for it."""
    return ThreadGovernor()
