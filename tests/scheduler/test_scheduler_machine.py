"""The scheduler under random pressure, with a stand-in executor that checks every token of
every context (tests/fakes.py): a hypothesis state machine of adds (priorities, n > 1,
shared prefixes), aborts and steps over random configurations; a progress watchdog on
adversarial pools; and a 500-request soak."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pagedkv.paged import blocks_for
from pagedkv.scheduler import EngineConfig, LLMEngine, SamplingParams
from pagedkv.scheduler.request import FinishReason, RequestStatus
from tests.fakes import ContentExecutor, soak
from tests.helpers import assert_drained

MAX_LEN = 40


class SchedulerMachine(RuleBasedStateMachine):
    coverage: Counter[str] = Counter()  # which pressure paths the runs took, over all examples

    def __init__(self) -> None:
        super().__init__()
        self._engine: LLMEngine | None = None  # made by setup, the first rule
        self._executor: ContentExecutor | None = None
        self.next_id = 0
        self.ended: set[str] = set()

    @property
    def engine(self) -> LLMEngine:
        assert self._engine is not None, "setup runs first"
        return self._engine

    @property
    def executor(self) -> ContentExecutor:
        assert self._executor is not None, "setup runs first"
        return self._executor

    @initialize(
        block_size=st.integers(1, 4),
        extra_blocks=st.integers(0, 6),
        budget=st.integers(1, 20),
        max_num_seqs=st.integers(1, 6),
        swap=st.sampled_from([None, 0, 4, 64]),  # KiB of swap space (1 KiB blocks); None: recompute
        caching=st.booleans(),
        chunked=st.booleans(),
        watermark=st.sampled_from([0.0, 0.1]),
        patience=st.integers(0, 4),
    )
    def setup(self, block_size, extra_blocks, budget, max_num_seqs, swap, caching, chunked, watermark, patience):
        self.config = EngineConfig(
            block_size=block_size,
            num_blocks=blocks_for(MAX_LEN, block_size) + extra_blocks,
            max_num_batched_tokens=budget if chunked else MAX_LEN + budget,
            max_num_seqs=max_num_seqs,
            preemption_mode="recompute" if swap is None else "swap",
            swap_space_bytes=(swap or 0) * 1024,
            enable_prefix_caching=caching,
            enable_chunked_prefill=chunked,
            kv_watermark=watermark,
            head_of_line_patience=patience,
            priority_aging_s=5.0,
        )
        self._executor = executor = ContentExecutor(max_model_len=MAX_LEN)
        self._engine = LLMEngine(executor, self.config, clock=lambda: float(executor.plans))

    @rule(data=st.data(), prompt_len=st.integers(1, 24), max_tokens=st.integers(1, 12), priority=st.integers(0, 2),
          shared=st.booleans())
    def add(self, data, prompt_len, max_tokens, priority, shared):
        n = data.draw(st.integers(1, self.config.max_num_seqs))
        tokens = st.lists(st.integers(0, 63), min_size=prompt_len, max_size=prompt_len)
        prompt = [7] * prompt_len if shared else data.draw(tokens)
        rid = f"r{self.next_id}"
        self.next_id += 1
        params = SamplingParams(temperature=1.0, n=n, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(rid, prompt, params, priority=priority)

    @precondition(lambda self: self._engine is not None and self._engine.has_unfinished_requests())
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.engine.scheduler.requests)))
        self.engine.abort(rid)

    @precondition(lambda self: self._engine is not None)
    @rule()
    def step(self):
        busy = self.engine.has_unfinished_requests()
        plans_before, empty_before = self.executor.plans, self.executor.empty_plans
        for out in self.engine.step():
            if out.finished:
                assert out.request_id not in self.ended, "a request ended twice"
                self.ended.add(out.request_id)
        assert self.executor.plans == plans_before + 1
        stats = self.engine.stats()
        self.coverage.update(
            swapped=stats.num_swapped_out > 0, recomputed=stats.num_recomputed > 0, forked=stats.num_running > 1
            and any(len(r.group) > 1 for r in self.engine.scheduler.requests.values()),
            prefix_hit=stats.num_prefix_hit_tokens > 0, unchunked=not self.config.enable_chunked_prefill,
        )
        if busy:
            assert self.executor.empty_plans == empty_before, "a step scheduled nothing while requests waited"

    @invariant()
    def limits_hold(self):
        if self._engine is None:
            return
        assert self.executor.max_batched_tokens <= self.config.max_num_batched_tokens
        assert self.executor.max_scheduled <= self.config.max_num_seqs
        assert self.engine.scheduler.num_seats_taken <= self.config.max_num_seqs

    @invariant()
    def queues_and_blocks_agree(self):
        if self._engine is None:
            return
        scheduler, kv = self.engine.scheduler, self.engine.kv_manager
        waiting, running = set(map(id, scheduler.waiting)), set(map(id, scheduler.running))
        assert not waiting & running, "a request is in two queues"
        live = [s for r in scheduler.requests.values() for s in r.group if s.status is not RequestStatus.FINISHED]
        assert {id(s) for s in live} == waiting | running, "every unfinished sequence is in exactly one queue"
        for s in scheduler.running:
            assert kv.has(s.seq_id) and kv.table(s.seq_id).num_tokens >= s.num_computed_tokens
        for s in scheduler.waiting:
            assert not kv.has(s.seq_id)
            assert kv.swap.has(s.seq_id) == s.swapped
            assert s.swapped or s.num_computed_tokens == 0
        assert scheduler.waiting == sorted(scheduler.waiting, key=lambda r: r.rank)
        assert scheduler.running == sorted(scheduler.running, key=lambda r: r.rank)
        kv.check()

    def teardown(self):
        if self._engine is None:
            return
        for _ in range(5000):
            if not self.engine.has_unfinished_requests():
                break
            self.step()
        self.step()  # delivers the final outputs of the last aborts
        assert_drained(self.engine)
        assert self.engine.kv_manager.swap.num_used == 0
        assert self.ended == {f"r{i}" for i in range(self.next_id)}, "every request ended, none lost"


def test_scheduler_state_machine():
    SchedulerMachine.coverage.clear()
    run_state_machine_as_test(
        SchedulerMachine,
        settings=settings(max_examples=300, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )
    for path in ("swapped", "recomputed", "forked", "prefix_hit", "unchunked"):
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
