"""The thread governor: PyTorch's thread count follows the cores other work leaves free."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagedkv.models.threads import SAMPLE_INTERVAL_S, ThreadGovernor, others_running


def governed(samples: list[int | None], max_threads: int = 4) -> tuple[list[int], list[int]]:
    """Feed the governor one sample per interval; returns the thread count after each, and the
    counts it set."""
    pending = iter(samples)
    now = [0.0]
    set_to: list[int] = []
    governor = ThreadGovernor(max_threads, sample=lambda: next(pending), clock=lambda: now[0],
                              set_threads=set_to.append)
    seen = []
    for _ in samples:
        seen.append(governor.update())
        now[0] += 1.5 * SAMPLE_INTERVAL_S
    return seen, set_to


def test_threads_drop_to_the_free_cores_after_two_agreeing_samples_and_come_back():
    seen, set_to = governed([0, 1, 0, 1, 1, 3, 3, 3, 5, 5, 0, 0])
    # a lone busy sample moves nothing; two in a row do; never below one thread
    assert seen == [4, 4, 4, 4, 3, 3, 1, 1, 1, 1, 1, 4]
    assert set_to == [3, 1, 4]


def test_unknown_load_changes_nothing():
    seen, set_to = governed([None, None, 2, None, 2])
    assert seen == [4, 4, 4, 4, 4] and set_to == []  # the two 2s are not consecutive samples


def test_samples_at_most_once_per_interval():
    calls: list[int] = []

    def sample() -> int:
        calls.append(1)
        return 1

    governor = ThreadGovernor(2, sample=sample, clock=lambda: 5.0, set_threads=lambda n: None)
    for _ in range(10):
        governor.update()
    assert len(calls) == 1


def test_others_running_reads_proc(tmp_path: Path):
    (tmp_path / "loadavg").write_text("0.50 0.40 0.30 5/120 4242\n")
    tasks = tmp_path / "self" / "task"
    for tid, state in [(1, "R"), (2, "S"), (3, "R")]:
        (tasks / str(tid)).mkdir(parents=True)
        (tasks / str(tid) / "stat").write_text(f"{tid} (python (x) y) {state} 1 2 3\n")
    assert others_running(tmp_path) == 3  # 5 runnable, 2 of them ours
    assert others_running(tmp_path / "missing") is None


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="needs Linux /proc")
def test_a_busy_neighbour_is_seen():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert max(others_running() or 0 for _ in range(20)) >= 1
    finally:
        busy.kill()
        busy.wait()
