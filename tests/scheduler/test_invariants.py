"""Every check of the scheduler's invariant catalogue holds on a healthy engine and, on queues
broken the way its bug class breaks them, names itself and the offending request."""

from __future__ import annotations

import pytest

from pagedkv.scheduler import EngineConfig, LLMEngine, SamplingParams
from pagedkv.testing import invariants as inv
from tests.helpers import RecordingExecutor


@pytest.fixture
def engine() -> LLMEngine:
    """Two running requests and one waiting, on a pool of 6 two-token blocks."""
    engine = LLMEngine(RecordingExecutor(), EngineConfig(block_size=2, num_blocks=6, max_num_seqs=2))
    for i in range(3):
        engine.add_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=4))
    engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 1
    assert inv.violations(inv.SCHEDULER_CHECKS, engine.scheduler) == []
    return engine


@pytest.mark.parametrize(("break_it", "check", "seq"), [
    (lambda s: s.waiting.append(s.running[0]), inv.one_queue_per_sequence, "r0"),
    (lambda s: s.running.reverse(), inv.queues_sorted_by_rank, "r0"),
    (lambda s: setattr(s.running[0], "num_computed_tokens", 9), inv.running_hold_their_context, "r0"),
    (lambda s: setattr(s.waiting[0], "num_computed_tokens", 2), inv.waiting_hold_no_blocks, "r2"),
    (lambda s: s.kv.allocate_slots("ghost", 2), inv.no_orphan_blocks, "ghost"),
    (lambda s: setattr(s, "_fork_seats", 5), inv.seats_within_limit, None),
])
def test_each_scheduler_check_names_itself_and_the_request(engine, break_it, check, seq) -> None:
    scheduler = engine.scheduler
    break_it(scheduler)
    found = check(scheduler)
    assert found is not None and found.invariant == check.__name__ and found.request == seq, found
