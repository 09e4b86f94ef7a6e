"""Engine behaviour: abort in every state, stop conditions, seeds, timestamps and stats."""

from __future__ import annotations

import pytest

from pagedkv.errors import EngineBusyError, InvalidRequestError
from pagedkv.paged.block_pool import BlockPoolError
from pagedkv.paged.invariants import InvariantViolation
from pagedkv.scheduler import EngineConfig, FinishReason, LLMEngine, RequestStatus, SamplingParams
from tests.fakes import FailingRunner
from tests.helpers import assert_drained, drain, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def run_until(engine, condition, max_steps=200):
    for _ in range(max_steps):
        if condition():
            return
        engine.step()
    raise AssertionError("condition never met")


def test_step_with_nothing_to_do_returns_empty(make_engine):
    engine = make_engine(num_blocks=8)
    assert engine.step() == []
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("leak", ["table with blocks", "empty table"])
def test_an_idle_engine_does_not_hide_a_leak(engine_with, leak):
    """Idle, every step checks in O(1) that no table, block, stored token or swap block is
    still held: a sequence the bookkeeping forgot to free surfaces at the next step."""
    engine, _ = engine_with(block_size=4, num_blocks=8)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
    engine.kv_manager.allocate_slots("forgotten", 5 if leak == "table with blocks" else 0)
    with pytest.raises(BlockPoolError, match="idle, yet 1 tables, .* a leak"):
        engine.step()
    engine.kv_manager.free("forgotten")


def test_abort_running_request_frees_its_blocks(make_engine):
    engine = make_engine(block_size=4, num_blocks=32)
    engine.add_request("a", list(range(1, 30)), GREEDY)
    engine.add_request("b", list(range(40, 49)), GREEDY)  # no prefix shared with a
    engine.step()
    held_by_a = len(engine.kv_manager.block_ids("a"))
    used = engine.kv_manager.pool.num_used
    engine.abort("a")
    assert engine.kv_manager.pool.num_used == used - held_by_a
    assert not engine.kv_manager.has("a")
    engine.kv_manager.check()
    outputs = [o for _ in range(20) for o in engine.step()]
    final_a, rest = outputs[0], outputs[1:]
    assert (final_a.request_id, final_a.finished, final_a.finish_reason) == ("a", True, FinishReason.ABORT)
    assert len(final_a.output_token_ids) == 1 and final_a.new_token_ids == []
    assert {o.request_id for o in rest} == {"b"}


def test_abort_is_idempotent_in_every_state(make_engine):
    """Preempted, waiting, running, finished and unknown requests can all be aborted, twice;
    each frees its blocks exactly once and the others carry on."""
    engine = make_engine(block_size=2, num_blocks=12, max_num_seqs=2)
    for rid in "abcd":
        engine.add_request(rid, [5] * 7, GREEDY)
    requests = dict(engine.scheduler.requests)
    run_until(engine, lambda: requests["b"].num_preemptions > 0)
    assert [requests[r].status for r in "abcd"] == [RequestStatus.RUNNING] + [RequestStatus.WAITING] * 3

    def abort_twice(rid: str, frees: int) -> None:
        used = engine.kv_manager.pool.num_used
        engine.abort(rid)
        engine.abort(rid)
        assert engine.kv_manager.pool.num_used == used - frees
        engine.kv_manager.check()

    abort_twice("b", 0)  # preempted: its blocks went back when it was preempted
    abort_twice("c", 0)  # waiting, never started
    abort_twice("a", len(engine.kv_manager.block_ids("a")))  # running
    run_until(engine, lambda: requests["d"].finished)
    abort_twice("d", 0)  # finished
    abort_twice("unknown", 0)
    assert [requests[r].finish_reason for r in "abcd"] == [FinishReason.ABORT] * 3 + [FinishReason.LENGTH]
    assert engine.step() == []


def test_abort_reports_one_final_output_then_nothing(make_engine):
    engine = make_engine(num_blocks=16)
    engine.add_request("x", [1, 2, 3], GREEDY)
    engine.step()
    engine.abort("x")
    engine.abort("x")
    assert engine.scheduler.requests == {}
    [final] = engine.step()
    assert final.request_id == "x" and final.finished and final.finish_reason is FinishReason.ABORT
    assert engine.step() == []


def test_abort_inside_generate_returns_the_aborted_output(make_engine, tiny_model):
    """A callback that aborts another request mid-run: generate() still returns every output."""
    engine = make_engine(block_size=4, num_blocks=64)
    prompts = random_prompts(seed=8, n=4, vocab=tiny_model.vocab_size)

    def abort_second(out):
        if out.request_id == "generate-0" and len(out.output_token_ids) == 3:
            engine.abort("generate-1")

    outputs = engine.generate(prompts, GREEDY, on_output=abort_second)
    reasons = [o.finish_reason for o in outputs]
    assert reasons == [FinishReason.LENGTH, FinishReason.ABORT, FinishReason.LENGTH, FinishReason.LENGTH]
    assert len(outputs[1].output_token_ids) < GREEDY.max_tokens


def test_tiny_temperature_is_greedy_not_nan(make_engine):
    engine = make_engine(num_blocks=16)
    greedy = engine.generate([[1, 2, 3]], GREEDY)[0].output_token_ids
    for t in (1e-45, 1e-30, 1e-6):
        params = SamplingParams(temperature=t, max_tokens=10, ignore_eos=True, seed=1)
        assert engine.generate([[1, 2, 3]], params)[0].output_token_ids == greedy


def test_a_runner_serves_one_engine(make_engine):
    engine = make_engine(num_blocks=16)
    with pytest.raises(RuntimeError, match="its own runner"):
        LLMEngine(engine.executor, EngineConfig(num_blocks=4))


def test_max_tokens_finishes_with_length(make_engine):
    engine = make_engine(num_blocks=16)
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert out.finished and out.finish_reason is FinishReason.LENGTH and len(out.output_token_ids) == 4


def test_stop_token_and_eos(make_engine, tiny_model):
    engine = make_engine(num_blocks=16)
    free_run = engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    stop_at = free_run.output_token_ids[3]
    first = free_run.output_token_ids.index(stop_at)
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.output_token_ids == free_run.output_token_ids[: first + 1]

    # Make the model's EOS the token it is about to emit: it stops there unless ignore_eos.
    engine.scheduler.eos_token_id = stop_at
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert out.finish_reason is FinishReason.STOP and out.output_token_ids[-1] == stop_at
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert out.output_token_ids == free_run.output_token_ids


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(make_engine, tiny_model):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    prompt = [7, 8, 9, 10]
    alone = make_engine(num_blocks=32).generate([prompt], seeded)[0].output_token_ids

    others = random_prompts(seed=9, n=6, vocab=tiny_model.vocab_size)
    crowd = make_engine(block_size=2, num_blocks=30, max_num_batched_tokens=7)
    params = [SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True)] * 3 + [seeded] + [GREEDY] * 3
    outputs = crowd.generate(others[:3] + [prompt] + others[3:], params)
    assert outputs[3].output_token_ids == alone
    assert crowd.stats().num_preemptions > 0, "the seeded request should survive preemption unchanged"

    other_seed = make_engine(num_blocks=32).generate([prompt], seeded.model_copy(update={"seed": 99}))[0]
    assert other_seed.output_token_ids != alone


def test_timestamps_and_stats(make_engine, tiny_model):
    engine = make_engine(block_size=4, num_blocks=64)
    prompts = random_prompts(seed=3, n=5, vocab=tiny_model.vocab_size)
    outputs = engine.generate(prompts, GREEDY)
    for prompt, o in zip(prompts, outputs, strict=True):
        m = o.metrics
        assert m.arrival_time <= m.first_token_time <= m.finish_time
        assert m.ttft >= 0 and m.num_prompt_tokens == len(prompt)
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_free == stats.kv_blocks_total == 64
    assert 0 < stats.kv_blocks_peak <= 64
    assert stats.num_generated_tokens == 5 * GREEDY.max_tokens
    assert stats.num_tokens_computed == sum(len(p) for p in prompts) + 5 * (GREEDY.max_tokens - 1)


def test_stats_while_running(make_engine):
    engine = make_engine(block_size=4, num_blocks=64, max_num_seqs=2)
    for i in range(3):
        engine.add_request(f"r{i}", [1] * 9, GREEDY)
    engine.step()
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (2, 1)
    # r1 found r0's two full blocks, registered while r0's step was being scheduled.
    assert stats.kv_blocks_used == 2 + 1 + 1 and stats.kv_blocks_free == 60
    assert stats.num_prefix_hit_tokens == 8 and stats.kv_blocks_cached == 2
    for i in range(3):
        engine.abort(f"r{i}")


def test_generate_refuses_while_requests_are_in_flight(make_engine):
    engine = make_engine(num_blocks=16)
    engine.add_request("busy", [1, 2], GREEDY)
    with pytest.raises(EngineBusyError, match="in flight"):
        engine.generate([[1]], GREEDY)
    engine.abort("busy")


def test_request_id_can_be_reused_after_it_finishes(make_engine):
    """A finished id is free again, and a seeded request under it starts its seed afresh."""
    engine = make_engine(num_blocks=16)
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    runs = []
    for _ in range(2):
        engine.add_request("same", [1, 2], seeded)
        outs = [o for _ in range(20) for o in engine.step() if o.finished]
        runs.append(outs[0].output_token_ids)
    assert runs[0] == runs[1] and len(runs[0]) == 8


@pytest.mark.parametrize("caching", [True, False])
def test_a_failed_step_fails_its_requests_once_and_the_engine_keeps_serving(tiny_model, caching):
    from pagedkv.models import ModelRunner, generate_no_cache

    runner = FailingRunner(ModelRunner(tiny_model), fail_steps={3})
    engine = LLMEngine(runner, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=2, enable_prefix_caching=caching))
    prompts = {f"r{i}": [i + 1] * 9 + [7, 8] for i in range(4)}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finals, "exactly one terminal output"
                finals[out.request_id] = out
    failed = {rid for rid, o in finals.items() if o.finish_reason is FinishReason.ERROR}
    assert failed == {"r0", "r1"}, "the two requests of step 3 fail, the others complete"
    assert all("injected failure" in (finals[rid].error or "") for rid in failed)
    for rid in set(prompts) - failed:
        assert finals[rid].output_token_ids == generate_no_cache(tiny_model, prompts[rid], 5)
    assert_drained(engine)
    assert engine.kv_manager.num_cached_blocks == 0 or caching
    again = engine.generate([prompts["r0"]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    want = generate_no_cache(tiny_model, prompts["r0"], 5)
    assert again[0].output_token_ids == want, "no garbage served from the cache"
    assert_drained(engine)


def test_nan_logits_fail_that_request_alone(tiny_model):
    from pagedkv.models import ModelRunner, generate_no_cache

    engine = LLMEngine(
        FailingRunner(ModelRunner(tiny_model), nan_request="bad"), EngineConfig(block_size=4, num_blocks=64)
    )
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request("good", [1, 2, 3], params)
    engine.add_request("bad", [4, 5, 6], params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finals
                finals[out.request_id] = out
    assert finals["bad"].finish_reason is FinishReason.ERROR and "non-finite logits" in (finals["bad"].error or "")
    assert finals["good"].output_token_ids == generate_no_cache(tiny_model, [1, 2, 3], 4)
    assert_drained(engine)


def test_generate_survives_on_output_aborting_its_own_requests(engine_with):
    """Issue 15: aborting from on_output left the abort's final output for a step that
    generate() never ran once nothing was left unfinished (a KeyError); now every prompt
    gets its final output, the aborted ones with finish_reason abort."""
    engine, _ = engine_with(num_blocks=32)
    seen: list[str] = []

    def abort_first(out) -> None:
        if out.request_id not in seen:
            seen.append(out.request_id)
            if len(seen) == 1:
                engine.abort(out.request_id)

    params = SamplingParams(max_tokens=5)
    outs = engine.generate([[1, 2], [3, 4]], params, on_output=abort_first)
    assert [o.outputs[0].finish_reason for o in outs] == [FinishReason.ABORT, FinishReason.LENGTH]
    # The last request aborted: no step is left to hand back its final output.
    outs = engine.generate([[1, 2]], params, on_output=lambda out: engine.abort(out.request_id))
    assert [(o.finished, o.outputs[0].finish_reason) for o in outs] == [(True, FinishReason.ABORT)]
    assert_drained(engine)


def test_step_from_a_second_thread_is_refused_while_one_runs(engine_with):
    """Issue 15: two threads in step() at once would schedule and update the same queues;
    the second is refused with a clear error and the first completes untouched."""
    import threading

    from pagedkv.scheduler import ConcurrentStepError

    engine, executor = engine_with(num_blocks=32)
    entered, release = threading.Event(), threading.Event()
    plain_execute = executor.execute

    def blocking_execute(plan):
        if not entered.is_set():  # only the first call waits, so a broken lock fails fast
            entered.set()
            assert release.wait(30)
        return plain_execute(plan)

    executor.execute = blocking_execute
    engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3))
    results: list[object] = []
    first = threading.Thread(target=lambda: results.append(engine.step()))
    first.start()
    assert entered.wait(30)
    try:
        with pytest.raises(ConcurrentStepError, match="already running in another thread") as err:
            engine.step()
        assert isinstance(err.value, RuntimeError) and isinstance(err.value, EngineBusyError)
    finally:
        release.set()
        first.join(30)
    [outputs] = results
    assert [o.output_token_ids for o in outputs] == [[1]]  # type: ignore[attr-defined]
    drain(engine)  # the lock is free again
    assert len(executor.plans) == 3


def test_sampling_params_copied_past_validation_are_revalidated(engine_with):
    """Issue 15: ``model_copy(update=...)`` skips pydantic's checks; add_request validates
    the parameters again, so a copied -5 temperature is refused by name."""
    engine, _ = engine_with(num_blocks=32)
    updates: list[tuple[dict[str, object], str]] = [
        ({"temperature": -5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop_token_ids": list(range(5000))}, "stop_token_ids"),
    ]
    for update, field in updates:
        bad = SamplingParams().model_copy(update=update)
        with pytest.raises(InvalidRequestError) as err:
            engine.add_request("r", [1, 2], bad)
        assert err.value.param == field
    assert not engine.has_unfinished_requests()
    good = SamplingParams(max_tokens=2).model_copy(update={"temperature": 0.5})
    assert engine.generate([[1, 2]], good)[0].output_token_ids == [1, 1]


def test_generate_takes_request_ids_and_reports_waiting_and_unfinished(engine_with):
    engine, _ = engine_with(block_size=4, num_blocks=16, max_num_seqs=1)
    seen: list[tuple[str, int, bool]] = []
    params = SamplingParams(max_tokens=2, ignore_eos=True)

    def watch(out):
        seen.append((out.request_id, engine.num_waiting_requests, engine.is_unfinished(out.request_id)))

    outs = engine.generate([[1, 2], [3, 4]], params, on_output=watch, request_ids=["x", "y"])
    assert [o.request_id for o in outs] == ["x", "y"]
    assert seen[0] == ("x", 1, True)  # one seat: y waits while x runs
    assert seen[-1] == ("y", 0, False)
    with pytest.raises(InvalidRequestError, match="request ids"):
        engine.generate([[1], [2]], params, request_ids=["z", "z"])


def test_the_debug_mode_checks_every_step_and_stops_at_the_first_violation(engine_with):
    """check_invariants=1 runs the catalogue after every step: a healthy run passes; a block
    the bookkeeping forgot (held by no request) stops the next step, which names itself."""
    engine, _ = engine_with(block_size=4, num_blocks=16, check_invariants=1)
    engine.generate([[1, 2, 3, 4, 5], [6, 7]], SamplingParams(max_tokens=4))  # healthy: no violation
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=8))
    engine.step()
    engine.kv_manager.allocate_slots("ghost", 4)
    with pytest.raises(InvariantViolation, match=r"after step \d+: no_orphan_blocks") as error:
        engine.step()
    assert error.value.violations[0].request == "ghost"
    engine.kv_manager.free("ghost")
    engine.abort("a")
    engine.step()


def test_the_debug_mode_checks_every_kth_step_only(engine_with, monkeypatch):
    engine, _ = engine_with(block_size=4, num_blocks=16, check_invariants=3)
    checked: list[object] = []

    def counting(kv: object) -> list:
        checked.append(kv)
        return []

    monkeypatch.setattr("pagedkv.scheduler.engine.kv_violations", counting)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=7))  # 1 prefill step + 6 decodes: 7 steps
    assert len(checked) == 2  # after steps 3 and 6
