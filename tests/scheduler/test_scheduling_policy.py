"""The scheduling policy under pressure, case by case, through the recording executor:
priorities and aging, priority preemption, swap versus recompute, the watermark, head-of-
line relief, and prefill without chunking. (Random interleavings are in
test_scheduler_machine.py; token-level equality with a real model in
test_pressure_differential.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from pagedkv.errors import InvalidRequestError
from pagedkv.scheduler import EngineConfig, LLMEngine, SamplingParams
from tests.helpers import RecordingExecutor, drain

SHORT = SamplingParams(max_tokens=4, ignore_eos=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def admission_order(executor: RecordingExecutor) -> list[str]:
    """Request ids in the order they were first scheduled."""
    seen: list[str] = []
    for plan in executor.plans:
        for s in plan.scheduled:
            if s.request.request_id not in seen:
                seen.append(s.request.request_id)
    return seen


def test_higher_priority_is_admitted_first_and_equals_are_fcfs(engine_with):
    engine, executor = engine_with(block_size=4, num_blocks=64, max_num_seqs=1)
    for rid, priority in [("low-a", 2), ("high-a", 0), ("mid", 1), ("high-b", 0), ("low-b", 2)]:
        engine.add_request(rid, [2, 3], SHORT, priority=priority)
    drain(engine)
    assert admission_order(executor) == ["high-a", "high-b", "mid", "low-a", "low-b"]


def test_aging_lets_a_long_waiting_low_priority_request_go_first(engine_with):
    clock = FakeClock()
    engine, executor = engine_with(clock=clock, block_size=4, num_blocks=64, max_num_seqs=1, priority_aging_s=10.0)
    engine.add_request("busy", [2], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.add_request("patient", [2, 3], SHORT, priority=1)  # ranked at 0 + 10
    clock.now = 9.0
    engine.add_request("urgent-early", [2, 3], SHORT, priority=0)  # ranked at 9: before it
    clock.now = 11.0
    engine.add_request("urgent-late", [2, 3], SHORT, priority=0)  # ranked at 11: after it
    drain(engine)
    assert admission_order(executor) == ["busy", "urgent-early", "patient", "urgent-late"]


def test_an_urgent_request_preempts_a_less_urgent_one_when_seats_run_out(engine_with):
    engine, executor = engine_with(block_size=4, num_blocks=64, max_num_seqs=2)
    for rid in ("a", "b"):
        engine.add_request(rid, [2, 3], SamplingParams(max_tokens=30, ignore_eos=True), priority=1)
    engine.step()
    engine.add_request("urgent", [4, 5], SHORT, priority=0)
    engine.step()
    plan = executor.plans[-1]
    assert plan.preempted == ["b"], "the newest of the less urgent goes"
    assert [s.request.request_id for s in plan.scheduled] == ["a", "urgent"]
    b = engine.scheduler.requests["b"]
    assert b.priority == 1 and b.rank[0] == b.arrival_time + 10.0, "it keeps its arrival and priority"
    engine.add_request("equal", [6], SHORT, priority=1)
    engine.step()
    assert executor.plans[-1].preempted == [], "equal priority never preempts"
    drain(engine)
    order = admission_order(executor)
    assert order.index("b") < order.index("equal"), "b is re-admitted at its old place in line"


def test_memory_preemption_takes_the_least_urgent_first(engine_with):
    engine, executor = engine_with(block_size=2, num_blocks=8, kv_watermark=0.0)
    engine.add_request("low", [2] * 3, SamplingParams(max_tokens=12, ignore_eos=True), priority=5)
    engine.add_request("high", [3] * 3, SamplingParams(max_tokens=12, ignore_eos=True), priority=0)
    while not any(p.preempted for p in executor.plans):
        engine.step()
    assert executor.plans[-1].preempted == ["low"]
    drain(engine)


@pytest.mark.parametrize("swap_space_bytes", [64 * 1024, 1024])
def test_swap_keeps_progress_and_falls_back_to_recompute_when_full(engine_with, swap_space_bytes):
    """The recording executor's blocks are 1 KiB: 64 swap blocks, or a single one."""
    engine, executor = engine_with(block_size=2, num_blocks=8, kv_watermark=0.0, preemption_mode="swap",
                                   swap_space_bytes=swap_space_bytes)
    assert engine.kv_manager.swap.num_blocks == swap_space_bytes // 1024
    engine.add_request("a", [2] * 3, SamplingParams(max_tokens=12, ignore_eos=True))
    engine.add_request("b", [3] * 3, SamplingParams(max_tokens=12, ignore_eos=True))
    while not any(p.preempted for p in executor.plans):
        engine.step()
    plan, b = executor.plans[-1], engine.scheduler.requests["b"]
    stats = engine.stats()
    if swap_space_bytes == 1024:  # b holds 3+ blocks: no room, so it is recomputed
        assert plan.swap_out == [] and b.num_computed_tokens == 0 and not b.swapped
        assert (stats.num_swapped_out, stats.num_recomputed) == (0, 1)
    else:
        assert len(plan.swap_out) == len({d for d, _ in plan.swap_out}) >= 3
        assert b.swapped and b.num_computed_tokens >= 4
        assert (stats.num_swapped_out, stats.num_recomputed) == (1, 0)
        assert stats.swap_blocks_used == len(plan.swap_out)
        while not any(p.swap_in for p in executor.plans):
            engine.step()
        resumed = executor.plans[-1]
        assert sorted(c for c, _ in resumed.swap_in) == sorted(c for _, c in plan.swap_out)
        [chunk] = [s for s in resumed.scheduled if s.request.request_id == "b"]
        assert chunk.start == b.num_computed_tokens - 1 and chunk.num_new_tokens == 1, "no recompute"
    drain(engine)
    assert engine.kv_manager.swap.num_used == 0


def test_admission_leaves_the_watermark_free_unless_nothing_runs(engine_with):
    engine, executor = engine_with(block_size=1, num_blocks=100, kv_watermark=0.1)  # 10 blocks
    engine.add_request("big", [2] * 95, SamplingParams(max_tokens=1))  # alone: the watermark is waived
    engine.step()
    assert executor.plans[-1].scheduled[0].num_new_tokens == 95
    drain(engine)
    engine.add_request("first", [2] * 50, SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    engine.add_request("second", [3] * 41, SamplingParams(max_tokens=1))  # 51 + 41 > 100 - 10
    engine.step()
    assert [s.request.request_id for s in executor.plans[-1].scheduled] == ["first"]
    engine.abort("first")
    drain(engine)


def test_a_blocked_long_prompt_lets_short_ones_pass_but_only_for_a_while(engine_with):
    engine, executor = engine_with(block_size=1, num_blocks=60, kv_watermark=0.0, head_of_line_patience=3)
    engine.add_request("running", [2] * 20, SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    engine.add_request("long", [3] * 40, SamplingParams(max_tokens=1))  # needs 40 of the 39 free
    for i in range(6):
        engine.add_request(f"short{i}", [4 + i], SamplingParams(max_tokens=20, ignore_eos=True))
        engine.step()
    admitted = admission_order(executor)
    assert admitted[:4] == ["running", "short0", "short1", "short2"], "three steps of patience"
    assert "short3" not in admitted, "then admission waits for the long prompt"
    drain(engine)
    admitted = admission_order(executor)
    assert admitted.index("long") < admitted.index("short3")


def test_without_chunked_prefill_a_step_prefills_or_decodes(engine_with):
    engine, executor = engine_with(block_size=4, num_blocks=128, enable_chunked_prefill=False,
                                   max_num_batched_tokens=1000)
    engine.add_request("chat", [2, 3], SamplingParams(max_tokens=6, ignore_eos=True))
    engine.step()
    engine.add_request("long", [2] * 300, SHORT)
    engine.step()
    assert [(s.request.request_id, s.num_new_tokens) for s in executor.plans[-1].scheduled] == [("long", 300)]
    drain(engine)
    for plan in executor.plans:
        sizes = {s.num_new_tokens > 1 or s.start == 0 for s in plan.scheduled}
        assert len(sizes) == 1, "no step mixes prefills and decodes"


def test_chunked_prefill_off_needs_a_budget_for_the_longest_prompt():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(512\) must be >= max_model_len \(1000\)"):
        LLMEngine(
            RecordingExecutor(), EngineConfig(num_blocks=64, enable_chunked_prefill=False, max_num_batched_tokens=512)
        )


def test_bad_scheduling_settings_name_the_field(engine_with):
    bad_settings: list[tuple[str, Any]] = [("preemption_mode", "drop"), ("kv_watermark", 1.0),
                                           ("priority_aging_s", 0.0), ("swap_space_bytes", -1),
                                           ("head_of_line_patience", -1)]
    for field, value in bad_settings:
        with pytest.raises(InvalidRequestError, match=field):
            EngineConfig(**{field: value})
    engine, _ = engine_with(block_size=4, num_blocks=16)
    for bad in (1.5, "1", True, 2**31):
        with pytest.raises(InvalidRequestError, match="priority must be an integer"):
            engine.add_request("x", [1], SHORT, priority=bad)
    assert not engine.has_unfinished_requests()
