"""Bulk decode steps (scheduler/decode_run.py) against the step loop they stand for.

Two identical schedulers get the same requests at the same steps; one always runs
``schedule()`` then ``update()``, the other takes every bulk decode step it is offered.
After every step the two must agree on everything: every request's tokens, progress and
timestamps, every block table, the pool's ref counts, free order and prefix-cache index,
and the counters. Then whole simulated workloads, with and without bulk steps, must give
identical records to the last bit, under every policy and pressure path.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pagedkv.errors import InvalidRequestError
from pagedkv.paged import KVCacheManager, blocks_for
from pagedkv.scheduler import EngineConfig, SamplingParams, StepResult
from pagedkv.scheduler.request import Request
from pagedkv.scheduler.scheduler import Scheduler
from pagedkv.sim import CostModel, LengthDist, WorkloadConfig, generate
from pagedkv.sim.driver import run_workload
from pagedkv.sim.executor import SimulatedExecutor, VirtualClock
from pagedkv.sim.policies import POLICIES

TOKEN = 0  # what the stand-in executor samples for every row
MAX_LEN = 48


class ClockedScheduler(Scheduler):
    time: float  # its clock, which the test's steps advance by one, as an executor's would


class Pair:
    """Two schedulers on the same config, one stepping plainly, one taking bulk steps.
    Each has a clock that its steps advance by one, as an executor's would."""

    def __init__(self, config: EngineConfig, eos: int | None) -> None:
        self.plain, self.bulk = (self._scheduler(config, eos) for _ in range(2))
        self.requests: tuple[list[Request], list[Request]] = ([], [])
        self.bulk_steps = 0

    @staticmethod
    def _scheduler(config: EngineConfig, eos: int | None) -> ClockedScheduler:
        assert config.num_blocks is not None
        kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching,
                            num_swap_blocks=config.swap_space_bytes // 1024)
        scheduler = ClockedScheduler(config, kv, MAX_LEN, eos, clock=lambda: scheduler.time)
        scheduler.time = 0.0
        return scheduler

    def add(self, rid: str, prompt: list[int], params: SamplingParams, priority: int) -> None:
        for scheduler, requests in zip((self.plain, self.bulk), self.requests, strict=True):
            request = Request(rid, prompt, params, arrival_time=scheduler.time, priority=priority)
            try:
                scheduler.add_request(request)
            except InvalidRequestError:
                return
            requests.append(request)

    def step(self, max_bulk: int) -> None:
        """A bulk run of up to ``max_bulk`` steps when offered, else one plain step, on
        both; then compare."""
        run = self.bulk.decode_run(TOKEN)
        steps = 1 if run is None else min(max_bulk, run.max_steps)
        for _ in range(steps):
            _plain_step(self.plain)
        if run is None:
            _plain_step(self.bulk)
        else:
            self.bulk.time += steps
            self.bulk.take_decode_steps(run, steps)
            self.bulk_steps += steps
        assert _state(self.plain, self.requests[0]) == _state(self.bulk, self.requests[1])
        self.bulk.kv.check()


def _plain_step(scheduler: ClockedScheduler) -> None:
    plan = scheduler.schedule()
    scheduler.time += 1
    scheduler.update(plan, StepResult([(TOKEN,) * s.samples for s in plan.scheduled]))


def _state(scheduler: Scheduler, requests: list[Request]) -> tuple:
    kv = scheduler.kv
    seqs = [s for r in requests for s in r.group]
    return (
        [(s.seq_id, s.token_ids, s.num_computed_tokens, s.status, s.finish_reason, s.first_scheduled_time,
          s.first_token_time, s.finish_time, s.num_preemptions, s.swapped) for s in seqs],
        [s.seq_id for s in scheduler.running], [s.seq_id for s in scheduler.waiting],
        kv.pool.snapshot(), kv.num_stored_tokens,
        {s.seq_id: (t.blocks, t.num_tokens, t.hashes) for s in seqs if kv.has(s.seq_id) for t in [kv.table(s.seq_id)]},
        scheduler.stats(), scheduler._ended_seq_ids, scheduler._head_passed_over,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    block_size=st.integers(1, 5),
    extra_blocks=st.integers(0, 30),
    budget=st.integers(1, 24),
    max_num_seqs=st.integers(1, 8),
    swap=st.booleans(),
    caching=st.booleans(),
    chunked=st.booleans(),
    eos=st.sampled_from([None, TOKEN, 5]),
)
def test_bulk_decode_steps_leave_every_state_as_the_step_loop_does(
    data, block_size, extra_blocks, budget, max_num_seqs, swap, caching, chunked, eos
):
    config = EngineConfig(
        block_size=block_size, num_blocks=blocks_for(MAX_LEN, block_size) + extra_blocks,
        max_num_batched_tokens=budget if chunked else MAX_LEN + budget, max_num_seqs=max_num_seqs,
        preemption_mode="swap" if swap else "recompute", swap_space_bytes=8 * 1024 if swap else 0,
        enable_prefix_caching=caching, enable_chunked_prefill=chunked, priority_aging_s=3.0,
    )
    pair = Pair(config, eos)
    for i in range(data.draw(st.integers(1, 60))):
        for _ in range(data.draw(st.integers(0, 2))):  # arrivals between steps
            prompt_len = data.draw(st.integers(1, 24))
            # Tokens from {0, 1, 2}: prompts share blocks with each other and with generated zeros.
            prompt = data.draw(st.lists(st.integers(0, 2), min_size=prompt_len, max_size=prompt_len))
            params = SamplingParams(
                temperature=0.0, n=data.draw(st.integers(1, min(3, max_num_seqs))),
                max_tokens=data.draw(st.integers(1, 20)),
                ignore_eos=data.draw(st.booleans()), stop_token_ids=data.draw(st.sampled_from([[], [TOKEN], [7]])),
            )
            pair.add(f"r{i}-{_}", prompt, params, data.draw(st.integers(0, 1)))
        if pair.plain.has_unfinished_requests():
            pair.step(data.draw(st.integers(1, 12)))
    while pair.plain.has_unfinished_requests():
        pair.step(1000)
    assert not pair.bulk.has_unfinished_requests()
    assert pair.bulk.kv.num_used_blocks == pair.plain.kv.num_used_blocks == 0


def test_a_run_goes_through_the_first_finish_and_not_past_the_free_blocks():
    config = EngineConfig(block_size=4, num_blocks=6, max_num_batched_tokens=64, enable_prefix_caching=False)
    pair = Pair(config, eos=None)
    pair.add("a", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=10), 0)
    pair.add("b", [1, 2], SamplingParams(temperature=0.0, max_tokens=20), 0)
    pair.step(1)  # prefill both: one token each
    run = pair.bulk.decode_run(TOKEN)
    assert run is not None and run.max_steps == 9  # the 9th samples a's last token: a finishes
    pair.step(1000)
    assert pair.bulk_steps == 9 and [r.request_id for r in pair.bulk.running] == ["b"]
    # Tighter: with a third sequence holding blocks, the run stops short of the step
    # that would need a block that is not free (the plain loop preempts there).
    tight = Pair(
        EngineConfig(block_size=2, num_blocks=7, max_num_batched_tokens=64, enable_prefix_caching=False), eos=None
    )
    for rid in "xyz":
        tight.add(rid, [1, 2], SamplingParams(temperature=0.0, max_tokens=12), 0)
    tight.step(1)  # 3 blocks in use, 4 free; each sequence needs one more every other step
    run = tight.bulk.decode_run(TOKEN)
    assert run is not None and run.max_steps == 2  # steps 0 and 2 take 3 blocks each: step 2 cannot
    tight.step(1000)
    tight.step(1000)  # the plain step that preempts
    assert tight.plain.num_preemptions == tight.bulk.num_preemptions == 1


def test_no_run_across_a_shared_block_or_a_stopping_token():
    # Forked sequences share a partly filled block until each copies it on write.
    fork = Pair(EngineConfig(block_size=4, num_blocks=20, max_num_batched_tokens=64), eos=None)
    fork.add("f", [1, 2, 3, 4, 5], SamplingParams(temperature=0.0, n=2, max_tokens=9), 0)
    fork.step(1)
    assert fork.bulk.decode_run(TOKEN) is None
    fork.step(1)
    assert fork.bulk.decode_run(TOKEN) is not None
    # A token that would stop a sequence (EOS here) is never taken in bulk.
    eos = Pair(EngineConfig(block_size=4, num_blocks=20), eos=TOKEN).bulk
    eos.add_request(Request("e", [1, 2], SamplingParams(temperature=0.0, max_tokens=9), arrival_time=0.0))
    plan = eos.schedule()
    eos.update(plan, StepResult([(9,)]))
    assert eos.decode_run(TOKEN) is None and eos.decode_run(9) is not None


PROFILE = CostModel(
    name="test", token_knots=[1, 2, 1026], token_costs_s=[0.024, 0.03, 1.054],
    per_decode_context_token_s=1e-6, per_prefill_attended_pair_s=1e-6, kv_bytes_per_token=1024, max_model_len=4096,
    wake_knots_s=[0.003, 0.03, 0.3], wake_costs_s=[0.0, 0.001, 0.003],  # gamma arrivals leave it idle at times
    light_load_slowdown=0.07, light_load_window_s=2.0,  # tests/sim/test_light_load.py: windows ending in a run
)


def _run(specs, engine, policy, closed, fast_forward, profile=PROFILE, noise_seed=None):
    clock = VirtualClock()
    return run_workload(specs, engine, SimulatedExecutor(profile, clock, noise_seed), clock, policy,
                        concurrency=5 if closed else None, fast_forward=fast_forward)


def _workload(engine, closed):
    return WorkloadConfig(
        num_requests=120, arrival="closed" if closed else "gamma", rate=2.0, cv=3.0, concurrency=5,
        preset=None, prompt=LengthDist(kind="lognormal", mean=60, sigma=0.8),
        output=LengthDist(kind="lognormal", mean=80, sigma=0.9),
        prefix_groups=3, prefix_len=20, max_model_len=engine.max_model_len, vocab_size=3, seed=11,
    )


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "engine",
    [
        EngineConfig(block_size=16, kv_cache_memory_bytes=2 * 2**20, max_model_len=1024, max_num_batched_tokens=256),
        EngineConfig(block_size=1, num_blocks=600, max_model_len=512, max_num_batched_tokens=64, max_num_seqs=6),
        EngineConfig(block_size=4, num_blocks=160, max_model_len=512, max_num_batched_tokens=600,
                     enable_chunked_prefill=False, preemption_mode="swap", swap_space_bytes=64 * 4096),
        EngineConfig(block_size=8, num_blocks=70, max_model_len=512, enable_prefix_caching=False),
    ],
    ids=["2MiB", "bs1-seats", "unchunked-swap", "tiny-no-cache"],
)
@pytest.mark.parametrize("closed", [False, True], ids=["poisson", "closed"])
def test_simulated_runs_are_identical_with_and_without_bulk_steps(policy, engine, closed, monkeypatch):
    specs = [s._replace(priority=i % 3) for i, s in enumerate(generate(_workload(engine, closed)))]
    plain = _run(specs, engine, policy, closed, fast_forward=False)
    schedules = []
    original = Scheduler.schedule

    def counting_schedule(self):
        schedules.append(1)
        return original(self)

    monkeypatch.setattr(Scheduler, "schedule", counting_schedule)
    bulk = _run(specs, engine, policy, closed, fast_forward=True)
    assert bulk == plain and len(plain.records) + plain.rejected == len(specs)
    if policy != "static":  # the one policy that never takes bulk steps (it pads finished rows)
        assert len(schedules) < len(plain.steps)  # these workloads keep requests waiting: few runs


@pytest.mark.parametrize("closed", [False, True], ids=["poisson", "closed"])
def test_noisy_runs_are_identical_with_and_without_bulk_steps(closed):
    """With step noise, a bulk run draws each step's multiplier at the time the step starts,
    as the step loop does: the same draws at the same times, so the same run to the bit."""
    engine = EngineConfig(block_size=16, kv_cache_memory_bytes=2 * 2**20, max_model_len=1024,
                          max_num_batched_tokens=256)
    noisy = PROFILE.model_copy(update={"step_noise": [-0.2, -0.05, 0.0, 0.1, 0.6], "run_noise": [-0.1, 0.1],
                                       "noise_slow_share": 0.6, "noise_corr_s": 0.5})
    specs = generate(_workload(engine, closed))
    plain, bulk = (_run(specs, engine, "paged", closed, ff, noisy, noise_seed=3) for ff in (False, True))
    assert bulk == plain and len(plain.records) == len(specs)
    assert bulk != _run(specs, engine, "paged", closed, True)  # the noise moved the steps
