"""Parallel sampling (``n > 1``): one prompt computed once, forked into n sequences that
share its blocks (the partly filled last block copied on write).

Each sequence must be exactly what a single request with seed ``seed + i`` gives, whatever
the block size, the pool (preemption), the token budget (chunked prompts) or the prefix
cache; greedy forks must all equal the full-recompute reference; and aborting a forked
request frees every block of every sequence.
"""

from __future__ import annotations

import random

import pytest

from pagedkv.errors import InvalidRequestError
from pagedkv.models import generate_no_cache
from pagedkv.paged import blocks_for
from pagedkv.scheduler import SamplingParams, StepResult
from pagedkv.scheduler.request import FinishReason
from tests.helpers import random_prompts


def _spy_plans(engine) -> list:
    """Record every plan the engine's scheduler makes."""
    plans, schedule = [], engine.scheduler.schedule

    def spy():
        plans.append(schedule())
        return plans[-1]

    engine.scheduler.schedule = spy
    return plans


@pytest.fixture(scope="module")
def singles(tiny_model):
    """Four prompts (lengths 3-29), each with n = 4 seeded sampling parameters, and what
    four single-sequence requests with seeds seed..seed+3 give (on a roomy engine)."""
    from pagedkv.models import ModelRunner
    from pagedkv.scheduler import EngineConfig, LLMEngine

    prompts = random_prompts(11, 4, tiny_model.vocab_size, min_len=3, max_len=29)
    params = [SamplingParams(temperature=1.0, n=4, seed=100 * i, max_tokens=9, ignore_eos=True) for i in range(4)]
    engine = LLMEngine(ModelRunner(tiny_model), EngineConfig(block_size=16, num_blocks=64, enable_prefix_caching=False))
    expected = []
    for prompt, sp in zip(prompts, params, strict=True):
        outs = engine.generate([prompt] * sp.n, [sp.for_sequence(i) for i in range(sp.n)])
        expected.append([o.output_token_ids for o in outs])
    return prompts, params, expected


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("budget", [1024, 5])
def test_each_fork_equals_a_single_request_with_its_seed(make_engine, singles, caching, block_size, budget):
    prompts, params, expected = singles
    engine = make_engine(block_size=block_size, num_blocks=600, max_num_batched_tokens=budget,
                         enable_prefix_caching=caching)
    plans = _spy_plans(engine)
    outs = engine.generate(prompts, params)
    for out, want in zip(outs, expected, strict=True):
        assert [s.index for s in out.outputs] == [0, 1, 2, 3]
        assert [s.output_token_ids for s in out.outputs] == want
        assert len({tuple(t) for t in want}) == 4, "a fixed seed still gives n different samples"
        assert all(s.finish_reason is FinishReason.LENGTH for s in out.outputs)
    assert all(len(p.scheduled) <= engine.config.max_num_seqs for p in plans)
    # The prompt is computed once per request, not once per sequence.
    assert engine.stats().num_preemptions == 0
    assert engine.stats().num_tokens_computed == sum(map(len, prompts)) + sum(4 * (9 - 1) for _ in prompts)


def test_a_pool_that_forces_preemption_still_gives_the_same_samples(make_engine, singles):
    prompts, params, expected = singles
    # Room for one sequence at its longest and a little more: forks preempt each other.
    block_size = 2
    longest = max(blocks_for(len(p) + sp.max_tokens - 1, block_size) for p, sp in zip(prompts, params, strict=True))
    engine = make_engine(block_size=block_size, num_blocks=longest + 2, max_num_batched_tokens=7)
    outs = engine.generate(prompts, params)
    assert [[s.output_token_ids for s in o.outputs] for o in outs] == expected
    assert engine.stats().num_preemptions > 0


def test_greedy_forks_all_equal_the_reference(make_engine, tiny_model):
    prompts = random_prompts(3, 5, tiny_model.vocab_size, min_len=1, max_len=20)
    engine = make_engine(block_size=4, num_blocks=64)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, n=3, max_tokens=6, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        want = generate_no_cache(tiny_model, prompt, 6)
        assert [s.output_token_ids for s in out.outputs] == [want] * 3


def test_forks_share_the_prompt_blocks_and_copy_the_partial_one_on_write(make_engine, tiny_model):
    prompt = random_prompts(4, 1, tiny_model.vocab_size, min_len=10, max_len=10)[0]  # 2 full blocks of 4 + 2
    engine = make_engine(block_size=4, num_blocks=32)
    plans = _spy_plans(engine)
    engine.add_request("r", prompt, SamplingParams(n=3, seed=1, max_tokens=4, ignore_eos=True))
    engine.step()  # prefill, sample 3 tokens, fork
    kv, seqs = engine.kv_manager, engine.scheduler.requests["r"].group
    tables = [kv.block_ids(s.seq_id) for s in seqs]
    assert tables[0] == tables[1] == tables[2] and len(tables[0]) == 3
    assert engine.stats().kv_blocks_used == 3  # three sequences, one copy of the prompt
    engine.step()  # each sequence writes its first token into the shared, partly filled block
    tables = [kv.block_ids(s.seq_id) for s in seqs]
    assert len({t[:2] for t in tables}) == 1, "the full prompt blocks stay shared"
    assert len({t[2] for t in tables}) == 3, "the partial block is copied on write"
    assert len(plans[-1].block_copies) == 2, "the last writer keeps the original: n - 1 copies"
    assert engine.stats().kv_blocks_used == 5
    while engine.has_unfinished_requests():
        engine.step()


def test_streamed_outputs_carry_every_sequence(make_engine, tiny_model):
    engine = make_engine(block_size=4, num_blocks=32)
    params = SamplingParams(n=3, seed=5, max_tokens=5, ignore_eos=True)
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    finals = []

    def collect(out):
        for s in out.outputs:
            streamed[s.index] += s.new_token_ids
        if out.finished:
            finals.append(out)

    [final] = engine.generate([[1, 2, 3, 4, 5]], params, on_output=collect)
    assert finals == [final]
    assert [streamed[i] for i in range(3)] == [s.output_token_ids for s in final.outputs]
    with pytest.raises(ValueError, match="3 sequences"):
        _ = final.text  # no single answer for n > 1
    assert final.metrics.finish_time is not None and final.metrics.ttft is not None


def test_sequences_of_different_lengths_finish_one_by_one(make_engine, tiny_model):
    """With a stop token, forks end at different steps; the request ends with the last."""
    prompt = random_prompts(8, 1, tiny_model.vocab_size, min_len=6, max_len=6)[0]
    engine = make_engine(block_size=4, num_blocks=64)
    probe = engine.generate([prompt], SamplingParams(n=6, seed=3, max_tokens=12, ignore_eos=True))[0]
    stop = probe.outputs[0].output_token_ids[2]  # sequence 0 stops at its third token
    params = SamplingParams(n=6, seed=3, max_tokens=12, ignore_eos=True, stop_token_ids=[stop])
    [out] = engine.generate([prompt], params)
    for s, full in zip(out.outputs, probe.outputs, strict=True):
        if stop in full.output_token_ids:
            cut = full.output_token_ids.index(stop) + 1
            assert s.output_token_ids == full.output_token_ids[:cut] and s.finish_reason is FinishReason.STOP
        else:
            assert s.output_token_ids == full.output_token_ids and s.finish_reason is FinishReason.LENGTH
    assert out.outputs[0].finish_reason is FinishReason.STOP


@pytest.mark.parametrize("steps", [0, 1, 2, 4])
def test_aborting_a_forked_request_frees_every_sequence(make_engine, tiny_model, steps):
    engine = make_engine(block_size=2, num_blocks=64, max_num_batched_tokens=4)
    engine.add_request("other", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    engine.add_request("r", list(range(1, 10)), SamplingParams(n=4, seed=0, max_tokens=20, ignore_eos=True))
    for _ in range(steps):
        engine.step()
    engine.abort("r")
    outs = engine.step()
    [final] = [o for o in outs if o.request_id == "r"]
    assert final.finished and all(s.finish_reason is FinishReason.ABORT for s in final.outputs)
    assert len(final.outputs) == (4 if steps >= 3 else 1)  # the 9-token prompt takes 3 steps of 4 tokens
    assert "r" not in engine.scheduler.requests
    held = {engine.kv_manager.table("other").blocks} if engine.kv_manager.has("other") else set()
    assert engine.stats().kv_blocks_used == sum(len(t) for t in held)
    while engine.has_unfinished_requests():
        engine.step()
    want = generate_no_cache(tiny_model, [5, 6, 7], 8)
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert out.output_token_ids == want


def test_max_num_seqs_counts_the_forks_to_come(make_engine, tiny_model):
    engine = make_engine(block_size=4, num_blocks=64, max_num_seqs=5)
    plans = _spy_plans(engine)
    prompts = random_prompts(9, 6, tiny_model.vocab_size, min_len=2, max_len=12)
    rng = random.Random(0)
    params = [
        SamplingParams(n=rng.randint(1, 5), seed=i, max_tokens=rng.randint(1, 6), ignore_eos=True) for i in range(6)
    ]
    outs = engine.generate(prompts, params)
    assert [len(o.outputs) for o in outs] == [p.n for p in params]
    assert max(len(p.scheduled) for p in plans) <= 5
    assert max(len(p.scheduled) for p in plans) == 5  # and it fills them


def test_bad_n_is_refused_and_changes_nothing(make_engine):
    engine = make_engine(block_size=4, num_blocks=16, max_num_seqs=4)
    engine.add_request("keep", [1, 2, 3], SamplingParams(max_tokens=3))
    before = (engine.stats(), list(engine.scheduler.requests))
    with pytest.raises(InvalidRequestError, match="n: Input should be greater than or equal to 1"):
        engine.add_request("bad", [1, 2], {"n": 0})
    with pytest.raises(InvalidRequestError, match="n: Input should be a valid integer"):
        engine.add_request("bad", [1, 2], {"n": "2"})
    with pytest.raises(InvalidRequestError, match="seed \\+ n - 1"):
        engine.add_request("bad", [1, 2], {"n": 2, "seed": 2**63 - 1})
    with pytest.raises(InvalidRequestError, match=r"n \(5\) exceeds max_num_seqs \(4\)"):
        engine.add_request("bad", [1, 2], SamplingParams(n=5))
    assert (engine.stats(), list(engine.scheduler.requests)) == before
    while engine.has_unfinished_requests():
        engine.step()


def test_a_failed_row_of_a_fork_fails_the_whole_request_once(engine_with):
    """One sequence's row fails (NaN logits) in the very step its sibling finishes: the
    request ends once, with the error, and nothing is left behind."""
    engine, executor = engine_with(block_size=4, num_blocks=16)
    execute = executor.execute

    def failing(plan):
        result = execute(plan)
        if len(executor.plans) == 2:  # the first decode step after the fork
            return StepResult(result.tokens, {0: "FloatingPointError: non-finite logits"})
        return result

    executor.execute = failing
    engine.add_request("r", [1, 2, 3], SamplingParams(n=2, max_tokens=2, ignore_eos=True))
    finals = [o for _ in range(3) for o in engine.step() if o.finished]
    assert len(finals) == 1 and finals[0].request_id == "r"
    assert [s.finish_reason for s in finals[0].outputs] == [FinishReason.ERROR] * 2
    assert "non-finite logits" in finals[0].error


def test_a_failed_forking_row_hands_its_unborn_forks_to_the_executor_as_finished(engine_with):
    """The row that would fork fails: the request ends, and the sequence ids its samples
    were to start (``sample_seq_ids``) reach the executor in ``finished_seq_ids``, so that
    per-sequence state (a seeded generator) made for them is dropped."""
    engine, executor = engine_with(block_size=4, num_blocks=16)
    execute = executor.execute

    def failing(plan):
        result = execute(plan)
        if len(executor.plans) == 1:
            assert plan.scheduled[0].sample_seq_ids == ("r", ("r", 1), ("r", 2))
            return StepResult(result.tokens, {0: "FloatingPointError: non-finite logits"})
        return result

    executor.execute = failing
    engine.add_request("r", [1, 2, 3], SamplingParams(n=3, seed=5, max_tokens=2))
    (out,) = engine.step()
    assert out.finished and out.error == "FloatingPointError: non-finite logits"
    engine.step()  # nothing to run; the plan still hands over what ended
    assert set(executor.plans[-1].finished_seq_ids) == {"r", ("r", 1), ("r", 2)}
