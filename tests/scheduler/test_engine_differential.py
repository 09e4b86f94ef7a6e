"""Greedy tokens from the paged engine equal a full recompute of the same weights, whatever
the block size, the token budget (chunking), the pool size (preemption) and the attention
path (the CPU kernel, and the gather path it is checked against)."""

from __future__ import annotations

import random

import pytest

from pagedkv.models import generate_no_cache
from pagedkv.paged import blocks_for
from pagedkv.scheduler import SamplingParams
from tests.helpers import ATTENTION_BACKENDS, random_prompts

NUM_REQUESTS = 14


@pytest.fixture(scope="module")
def workload(tiny_model):
    """Random prompts and lengths, with the reference continuation of each."""
    prompts = random_prompts(seed=1, n=NUM_REQUESTS, vocab=tiny_model.vocab_size, max_len=60)
    rng = random.Random(2)
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in prompts]
    expected = [generate_no_cache(tiny_model, p, sp.max_tokens) for p, sp in zip(prompts, params, strict=True)]
    return prompts, params, expected


def smallest_pool(workload, block_size: int) -> int:
    """The fewest blocks that still admit the longest request on its own."""
    prompts, params, _ = workload
    return max(blocks_for(len(p) + sp.max_tokens - 1, block_size) for p, sp in zip(prompts, params, strict=True))


@ATTENTION_BACKENDS
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("budget", [1024, 37, 5])
def test_ample_pool_matches_reference(make_engine, workload, block_size, budget, backend):
    prompts, params, expected = workload
    engine = make_engine(attention_backend=backend, block_size=block_size, num_blocks=512,
                         max_num_batched_tokens=budget)
    outputs = engine.generate(prompts, params)
    assert [o.output_token_ids for o in outputs] == expected
    assert engine.stats().num_preemptions == 0


@ATTENTION_BACKENDS
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("budget", [1024, 9])
def test_tiny_pool_preempts_and_matches_reference(make_engine, workload, block_size, budget, backend):
    prompts, params, expected = workload
    engine = make_engine(
        attention_backend=backend,
        block_size=block_size, num_blocks=smallest_pool(workload, block_size), max_num_batched_tokens=budget
    )
    outputs = engine.generate(prompts, params)
    assert [o.output_token_ids for o in outputs] == expected
    assert engine.stats().num_preemptions > 0, "the pool was meant to force preemption"
    assert sum(o.metrics.num_preemptions for o in outputs) == engine.stats().num_preemptions


def test_one_sequence_at_a_time_matches_reference(make_engine, workload):
    prompts, params, expected = workload
    engine = make_engine(block_size=4, num_blocks=64, max_num_seqs=1)
    assert [o.output_token_ids for o in engine.generate(prompts, params)] == expected


def test_streamed_tokens_add_up_to_the_final_output(make_engine, workload):
    prompts, params, expected = workload
    engine = make_engine(block_size=4, num_blocks=smallest_pool(workload, 4), max_num_batched_tokens=16)
    streamed: dict[str, list[int]] = {}
    outputs = engine.generate(
        prompts, params, on_output=lambda o: streamed.setdefault(o.request_id, []).extend(o.new_token_ids)
    )
    assert [streamed[o.request_id] for o in outputs] == expected


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("budget", [1024, 9, 3, None])  # 3 < block size; None: no chunked prefill
@pytest.mark.parametrize("priorities", [False, True])
def test_pressure_matches_reference(make_engine, tiny_model, workload, mode, budget, priorities):
    """Swap or recompute preemption, chunk budgets down to less than a block (or whole
    prompts only), random priorities, on the smallest pool: the same greedy tokens."""
    prompts, params, expected = workload
    block_size = 4
    swap_blocks = 2 * smallest_pool(workload, block_size)  # room for some victims, not all at once
    engine = make_engine(
        block_size=block_size, num_blocks=smallest_pool(workload, block_size), kv_watermark=0.0,
        max_num_batched_tokens=budget or tiny_model.max_model_len, enable_chunked_prefill=budget is not None,
        preemption_mode=mode, swap_space_bytes=swap_blocks * tiny_model.kv_cache_spec().bytes_per_block(block_size),
    )
    priority = [random.Random(i).randrange(3) for i in range(len(prompts))] if priorities else None
    outputs = engine.generate(prompts, params, priority=priority)
    assert [o.output_token_ids for o in outputs] == expected
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert (stats.num_swapped_out > 0) == (mode == "swap")
    assert engine.kv_manager.swap.num_used == 0
