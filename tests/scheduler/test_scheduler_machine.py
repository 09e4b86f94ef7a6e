"""The scheduler under random pressure, with a stand-in executor that checks every token of
every context: pagedkv.testing's state machine of adds (priorities, n > 1, shared
prefixes), aborts and steps over random configurations; a progress watchdog on
adversarial pools; and a 500-request soak."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from pagedkv.paged import blocks_for
from pagedkv.scheduler import EngineConfig, LLMEngine, SamplingParams
from pagedkv.scheduler.request import FinishReason
from pagedkv.testing import SchedulerMachine
from pagedkv.testing.executor import ContentExecutor
from tests.fakes import soak
from tests.helpers import assert_drained


def test_scheduler_state_machine():
    SchedulerMachine.coverage.clear()
    run_state_machine_as_test(
        SchedulerMachine,
        settings=settings(max_examples=300, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
    for path in ("swapped", "recomputed", "forked", "prefix_hit", "unchunked", "refused-never-fitting"):
        assert SchedulerMachine.coverage[path] > 0, f"no run exercised {path}"


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("chunked", [True, False])
def test_progress_on_a_pool_that_holds_one_longest_request(mode, chunked):
    """Every request is as long as the pool allows; each finishes within a step bound and
    no step is empty while any waits."""
    block_size, longest = 4, 37
    config = EngineConfig(block_size=block_size, num_blocks=blocks_for(longest - 1, block_size), preemption_mode=mode,
                          swap_space_bytes=8 * 1024, max_num_batched_tokens=7 if chunked else 64,
                          enable_chunked_prefill=chunked, kv_watermark=0.0)
    executor = ContentExecutor(max_model_len=64)
    engine = LLMEngine(executor, config)
    lengths = [(30, 7), (1, 36), (20, 17), (36, 1), (5, 5), (29, 8)]
    for i, (prompt, new) in enumerate(lengths):
        engine.add_request(f"r{i}", [i + 1] * prompt, SamplingParams(max_tokens=new, ignore_eos=True))
    bound = sum(p + n for p, n in lengths)  # the best-ranked request always advances and never loses work
    finished_at = {}
    for step in range(bound + 1):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id] = step
    assert len(finished_at) == len(lengths), f"unfinished after {bound} steps: {set(engine.scheduler.requests)}"
    assert executor.empty_plans == 0
    assert engine.stats().num_preemptions > 0
    assert_drained(engine)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_soak_500_requests_all_end_none_lost_nothing_leaks(mode):
    config = EngineConfig(block_size=2, num_blocks=30, max_num_batched_tokens=16, max_num_seqs=8,
                          preemption_mode=mode, swap_space_bytes=12 * 1024)
    engine, result = soak(500, config, seed=1)
    assert set(result.finished) == set(result.submitted) and len(result.submitted) == 500
    assert {r for r, why in result.finished.items() if why is FinishReason.ABORT} == result.aborted
    stats = engine.stats()
    assert stats.num_preemptions > 50 and (stats.num_swapped_out > 0) == (mode == "swap")
    assert result.max_seats <= 8
    assert_drained(engine)
    assert engine.kv_manager.swap.num_used == 0
